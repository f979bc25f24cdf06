"""GSNR transform cost per step: per-tensor vs foreach vs torch.compile'd, on real model shapes.

For the parameter shapes of a ResNet-18-style CNN (32×32 input) and a small transformer
encoder, times the GSNR maths alone (ĝ from ḡ and s, docs/SPEC.md §2) three ways, in the same
run: the per-tensor formulas, the foreach path (``gsnr_fused=False``) and the compiled kernel
(``gsnr_fused=True``, and the default where a compiler is present), and prints the kernel's
first-call (compile) time.

    .venv/bin/python bench/gsnr_fused.py [--threads 1] [--repeats 5]
"""
import argparse
import time

import torch
import torch.nn as nn

from hvd_lb.torch import gsnr as G


def resnet18_cifar():
    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)] + (
            [nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)] if stride != 1 or cin != cout else [])
    layers = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)]
    cin = 64
    for cout, stride in ((64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)):
        layers += block(cin, cout, stride)
        cin = cout
    return nn.Sequential(*layers, nn.Linear(512, 10))


def transformer():
    layer = nn.TransformerEncoderLayer(d_model=256, nhead=8, dim_feedforward=1024, batch_first=True)
    return nn.Sequential(nn.Embedding(8000, 256), nn.TransformerEncoder(layer, num_layers=4), nn.Linear(256, 8000))


def timed(fn, repeats):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'model':<12} {'params':>8} {'per-tensor':>11} {'foreach':>9} {'fused':>9} "
          f"{'foreach/fused':>13} {'compile s':>9}")
    for name, model in (("resnet18", resnet18_cifar()), ("transformer", transformer())):
        gs = [torch.randn_like(p) for p in model.parameters()]
        ss = [g * g + torch.rand_like(g) for g in gs]
        avgs = [torch.zeros_like(g) for g in gs]
        eps = [2.0 ** -21] * len(gs)
        steps = [3] * len(gs)
        single = timed(lambda: [G._gsnr_one(g, s, a, 3, 0.1, 0.9, 2.0 ** -21) for g, s, a in zip(gs, ss, avgs)],
                       args.repeats)
        work, scr = [s.clone() for s in ss], [torch.empty_like(g) for g in gs]

        def foreach():   # it overwrites s with ĝ: refilled first (one copy, counted in its time)
            torch._foreach_copy_(work, ss)
            return G._gsnr_foreach(gs, work, avgs, steps, eps, 0.1, 0.9, scr)

        foreach = timed(foreach, args.repeats)
        fn = G.compile_kernel(G._gsnr_into, (0.1, 0.9))
        outs = [torch.empty_like(g) for g in gs]
        t3 = torch.tensor(3.0, dtype=torch.float64)

        def fused():
            with G.specialized_floats():
                return [fn(*G.flat(g, s, a, o), t3, 0.1, 0.9, 2.0 ** -21) for g, s, a, o in zip(gs, ss, avgs, outs)]

        start = time.perf_counter()
        fused()
        compile_s = time.perf_counter() - start
        fused_t = timed(fused, args.repeats)
        n = sum(g.numel() for g in gs)
        print(f"{name:<12} {n / 1e6:>7.2f}M {single * 1e3:>9.1f}ms {foreach * 1e3:>7.1f}ms "
              f"{fused_t * 1e3:>7.1f}ms {foreach / fused_t:>13.2f} {compile_s:>9.1f}")


if __name__ == "__main__":
    main()
