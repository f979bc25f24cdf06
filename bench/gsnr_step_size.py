"""How much the GSNR transform shrinks the step, on real data (docs/SPEC.md §2 note).

A 784-256-10 MLP trains on Fashion-MNIST with momentum SGD (batch 1024, lr 0.05, 150
steps); at every step the batch is split into k micro-batches, whose gradients are the
k samples of docs/SPEC.md §1. For each k the script prints, averaged over the steps:
mean r over all elements, the share of elements clipped to γ, and ‖ĝ‖/‖ḡ‖ (β₃ = 0).
A VR rule takes steps about mean(r) times its base rule's at the same learning rate.

    .venv/bin/python bench/gsnr_step_size.py [--gamma 0.1] [--steps 150]
"""
import argparse

import numpy as np
import torch

from hvd_lb import reference
from hvd_lb.launch.data import load_fashion_mnist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gamma", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=1024)
    args = ap.parse_args()
    x, y = load_fashion_mnist("train")
    x = torch.tensor(x.reshape(len(x), -1))
    y = torch.tensor(y)
    print(f"γ = {args.gamma}, batch {args.batch}, {args.steps} steps of momentum SGD; means over steps")
    print(f"{'k':>4} {'mean r':>8} {'clipped':>8} {'|ĝ|/|ḡ|':>8}")
    for k in (2, 4, 8, 16, 32):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        gen = torch.Generator().manual_seed(1)
        rows = []
        for _ in range(args.steps):
            idx = torch.randint(len(x), (args.batch,), generator=gen)
            samples = []
            for xb, yb in zip(x[idx].chunk(k), y[idx].chunk(k)):
                model.zero_grad()
                torch.nn.functional.cross_entropy(model(xb), yb).backward()
                samples.append([p.grad.double().numpy().copy() for p in model.parameters()])
            mean, sq = reference.gradient_stats(samples)
            rs, n_clip, n = [], 0, 0
            g_hat2 = g2 = 0.0
            for g, s in zip(mean, sq):
                r, _, clipped = reference.gsnr_ratio(g, s, args.gamma)
                rs.append(r.ravel())
                n_clip += clipped * r.size
                n += r.size
                g_hat2 += float(np.sum((r * g) ** 2))
                g2 += float(np.sum(g * g))
            rows.append((float(np.concatenate(rs).mean()), n_clip / n, np.sqrt(g_hat2 / g2)))
            for p, g in zip(model.parameters(), mean):
                p.grad = torch.tensor(g, dtype=p.dtype)
            opt.step()
        m = np.mean(rows, axis=0)
        print(f"{k:>4} {m[0]:>8.3f} {m[1]:>8.3f} {m[2]:>8.3f}")


if __name__ == "__main__":
    main()
