"""Add a rule by the steps of docs/CONTRIBUTING.md alone and check it against the reference.

``python toy_rule.py torch|tf`` registers ``signsgd`` (w ← w − lr·(sign(g) + λw)) in a fresh
process (registration is global, so it must not leak into the test session) and prints one
JSON line: the largest relative deviation from the float64 reference for ``signsgd`` and
``vr-signsgd``, per-tensor and foreach (torch) or eager (TF).
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from hvd_lb import reference, rules  # noqa: E402

# Step 1: the table entry.
rules.register("signsgd", (rules.LR(0.01), rules.WEIGHT_DECAY), (), "signSGD: w ← w − lr·(sign(g) + λw)",
               "SignSGD")


# Step 2: the reference chain (a new transform where the existing ones do not cover it).
def scale_by_sign():
    return reference.Transform(reference._no_state,
                               lambda u, state, params, ctx: ([np.sign(x) for x in u], state))


reference.register("signsgd")(lambda hp: reference.chain(
    scale_by_sign(), reference.add_decayed_weights(hp["weight_decay"]), reference.scale_by_learning_rate()))

SHAPES = [(4, 3), (3,)]
STEPS = 6


def sequence():
    rng = np.random.default_rng(7)
    out = []
    for _ in range(STEPS):
        signal = [rng.standard_normal(s) for s in SHAPES]
        samples = [[x + rng.standard_normal(x.shape) for x in signal] for _ in range(4)]
        out.append(reference.gradient_stats(samples))
    return out


def reference_params(name, hp):
    rng = np.random.default_rng(0)
    ref = reference.ReferenceOptimizer(name, [rng.standard_normal(s) for s in SHAPES], **hp)
    for mean, sq in sequence():
        ref.step(mean, sq if ref.rule.gsnr else None)
    return ref.params


def deviation(params, expected):
    return max(float(np.max(np.abs(np.asarray(p, np.float64) - e)) / max(np.max(np.abs(e)), 1e-300))
               for p, e in zip(params, expected))


def run_torch(name, hp, foreach):
    import torch

    import hvd_lb.torch as lbt

    # Step 3: one torch kernel entry, per-tensor and foreach side by side.
    if "signsgd" not in lbt.KERNELS:
        def single(group, ps, gs, states, _):
            for p, g in zip(ps, gs):
                d = torch.sign(g)
                p.sub_(group["lr"] * (d + group["weight_decay"] * p if group["decay"] else d))

        def multi(group, ps, gs, states, _):
            d = torch._foreach_sign(gs)
            if group["decay"] and group["weight_decay"] != 0.0:
                torch._foreach_add_(d, ps, alpha=group["weight_decay"])
            torch._foreach_add_(ps, d, alpha=-group["lr"])

        lbt.register("signsgd", single, multi)
    rng = np.random.default_rng(0)
    params = [torch.tensor(rng.standard_normal(s)).requires_grad_(True) for s in SHAPES]
    opt = lbt.OPTIMIZERS[name](params, foreach=foreach, **hp)
    for mean, sq in sequence():
        for p, g in zip(params, mean):
            p.grad = torch.tensor(g)
        if name.startswith("vr-"):
            opt.set_grad_sq([torch.tensor(s) for s in sq])
        opt.step()
    return [p.detach().numpy() for p in params]


def run_tf(name, hp):
    import tensorflow as tf

    import hvd_lb.tf as lbtf
    from hvd_lb.tf import optimizers as tf_optimizers

    # Step 4: one TF function in the per-name dict.
    if "signsgd" not in tf_optimizers.UPDATES:
        @tf_optimizers.register("signsgd")
        def _signsgd(c, g, w, state):
            return w - c.lr * (tf.sign(g) + c.wd * w)

    rng = np.random.default_rng(0)
    variables = [tf.Variable(rng.standard_normal(s)) for s in SHAPES]
    # include=["*"]: decay on every tensor, as in the reference (Keras classes exclude ndim ≤ 1).
    opt = lbtf.OPTIMIZERS[name](include=["*"], **{rules.KERAS_NAMES.get(k, k): v for k, v in hp.items()})
    for mean, sq in sequence():
        if name.startswith("vr-"):
            opt.set_grad_sq([tf.constant(s) for s in sq])
        opt.apply([tf.constant(g) for g in mean], variables)
    return [v.numpy() for v in variables]


def main():
    backend = sys.argv[1]
    out = {}
    # adapt/decay default to on for every tensor in both the reference and the classes.
    for name, hp in (("signsgd", {"lr": 0.05, "weight_decay": 0.01}),
                     ("vr-signsgd", {"lr": 0.05, "weight_decay": 0.01, "gamma": 0.3})):
        expected = reference_params(name, hp)
        if backend == "torch":
            for foreach in (False, True):
                out[f"{name}/foreach={foreach}"] = deviation(run_torch(name, hp, foreach), expected)
        else:
            out[name] = deviation(run_tf(name, hp), expected)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
