"""GSNR r from float16 squares against float32 squares on the same gradients (not a test).

Run:  .venv/bin/python bench/squares16_r.py [--steps 0,100,400]

The demo's MLP (784-128-64-10) on Fashion-MNIST, trained with plain SGD (batch 256, lr 0.1)
to each of ``--steps``; there, one global batch of 8192 is split into k gradient samples
as the demo and larger runs would have them: W workers × M micro-batches (2 × 4, 8 × 1 and
768 × 1, each sample of 8192/k images). Per tensor:

* float32: s = mean of x² in float32, r with ε_w = 2⁻²¹ (SPEC §2);
* float16: each worker's share M·Σg_m² scaled by 2^e (e = ``squares16.next_exponent`` of the
  max of a previous s: here that of the same step's s divided by ``--drift``, i.e. s grew
  (> 1) or shrank (< 1) by that factor since the scale was set; 16 overflows: redone), rounded to float16, summed over the
  workers one by one in float16 (a ring's order), times 1/W in float16, unscaled
  s = max(2^−e·q̄, ḡ² + a) in float32 (SPEC §1), r with ε_w = ``variance_floor(W)``.

Reported over all elements: mean |Δr|, max |Δr|, the share whose clip state (r̃ < γ, γ ≤ r̃ ≤ 1,
r̃ > 1) differs, mean r of each, and the tensors a real run would have redone.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from hvd_lb import formulas, squares16  # noqa: E402
from hvd_lb.launch.data import load_fashion_mnist  # noqa: E402
from hvd_lb.torch._ops import T  # noqa: E402

GAMMA = 0.1


def model_at(step, x, y, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(),
                            torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(step):
        idx = torch.randint(0, len(x), (256,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x[idx]), y[idx]).backward()
        opt.step()
    return m


def samples(m, x, y, k, seed):
    """k per-sample-group gradients of one global batch of 8192 (each group 8192/k images)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    idx = torch.randint(0, len(x), (8192,), generator=g)
    out = []
    for chunk in torch.tensor_split(idx, k):
        m.zero_grad()
        torch.nn.functional.cross_entropy(m(x[chunk]), y[chunk]).backward()
        out.append([p.grad.detach().clone() for p in m.parameters()])
    return out


def state(r_tilde):
    return np.where(r_tilde < GAMMA, 0, np.where(r_tilde > 1.0, 2, 1))


def r_of(mean, s, eps):
    """r and r̃ of one tensor (formulas.gsnr_relative: r̃ for the clip state, r = clip(r̃, γ, 1))."""
    rt, _ = formulas.gsnr_relative(T, mean, s, eps)
    return T.clip(rt, GAMMA, 1.0).numpy(), rt.numpy()


def compare(xs, W, M, drift):
    """xs: k = W·M samples (lists of tensors). Returns per-element arrays and the redo count."""
    k = W * M
    dr, changed, r32s, r16s, redo, floor_only = [], [], [], [], 0, []
    for i in range(len(xs[0])):
        x = torch.stack([s[i] for s in xs]).float() * M  # x_{w,m} = M·g_{w,m} (SPEC §1), samples w-major
        mean = x.mean(0)
        s32 = (x * x).mean(0)
        shares = (x * x).reshape(W, M, *x.shape[1:]).mean(1)  # (1/M)Σ_m x² = M·Σ_m g_m²
        e = squares16.next_exponent(float(s32.max()) / drift, W)
        q = (shares * 2.0 ** e).numpy().astype(np.float16)
        acc = q[0]
        for w in range(1, W):
            acc = (acc.astype(np.float32) + q[w].astype(np.float32)).astype(np.float16)
        qbar = (acc.astype(np.float32) * np.float32(1.0 / W)).astype(np.float16)
        m16 = float(np.max(qbar.astype(np.float32)))
        if squares16.needs_redo(m16, bool(mean.any())):
            redo += 1
            s16 = s32
        else:
            s16 = torch.maximum(torch.from_numpy(qbar.astype(np.float32)) * 2.0 ** -e,
                                mean * mean + squares16.absolute_floor(e, W))
        r32, rt32 = r_of(mean, s32, formulas.variance_floor(False))
        r16, rt16 = r_of(mean, s16, squares16.variance_floor(W))
        r32f, _ = r_of(mean, s32, squares16.variance_floor(W))  # float32 s, float16's floor
        dr.append(np.abs(r16 - r32).ravel())
        floor_only.append(np.abs(r32f - r32).ravel())
        changed.append((state(rt16) != state(rt32)).ravel())
        r32s.append(r32.ravel())
        r16s.append(r16.ravel())
    cat = np.concatenate
    return cat(dr), cat(changed), cat(r32s), cat(r16s), redo, cat(floor_only)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", default="0,100,400")
    ap.add_argument("--drift", default="1,0.125,16", help="s now / s when the scale was set")
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, y = load_fashion_mnist("train")
    x = torch.from_numpy((x.reshape(len(x), -1) - 0.2860) / 0.3530).float()
    y = torch.from_numpy(y)
    print("| SGD steps | W × M | s now / s at scale | mean abs Δr | of which the floor alone | max abs Δr "
          "| clip state changed | mean r f32 | mean r f16 | tensors redone |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for step in (int(s) for s in args.steps.split(",")):
        m = model_at(step, x, y)
        for W, M in ((2, 4), (8, 1), (768, 1)):
            xs = samples(m, x, y, W * M, step)
            for drift in (float(d) for d in args.drift.split(",")):
                dr, ch, r32, r16, redo, fl = compare(xs, W, M, drift)
                print(f"| {step} | {W} × {M} | {drift:g} | {dr.mean():.2e} | {fl.mean():.2e} | {dr.max():.2e} "
                      f"| {100 * ch.mean():.3f} % "
                      f"| {r32.mean():.4f} | {r16.mean():.4f} | {redo} of 6 |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
