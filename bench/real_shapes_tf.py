"""TF/Keras 3 benchmark on real model shapes: a ResNet-18-style CNN (32×32 input) and a small
transformer encoder. Run by hand; every figure is a ratio against a baseline measured in the
same run (round-robin over the variants, medians). Not a test.

Environment (as root): OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
PYTHONPATH=$PWD OMP_NUM_THREADS=1.

1. Full training step (one compiled ``tf.function``: forward, backward, ``opt.apply``):

    horovodrun -np 2 -H localhost:2 --gloo .venv/bin/python bench/real_shapes_tf.py [--model resnet18,transformer]

   Baselines: ``hvd_lb.tf.DistributedOptimizer`` wrapping ``keras.optimizers.SGD(momentum=0.9)``
   and ``keras.optimizers.AdamW`` — for a non-VR Keras optimizer that is plain Horovod: one
   ``hvd.grouped_allreduce`` of every gradient, then the Keras step (``horovod.tensorflow.keras``
   itself is broken on Keras 3, horovod#4290, so it cannot be the baseline). Against them:
   hvd_lb non-VR ``lamb``, VR ``vr-lamb`` and ``GSNR(AdamW)`` with s as float32 and as
   bfloat16, and one extra ``hvd.grouped_allreduce`` of every gradient timed in the same
   rounds: "VR extra / one all-reduce" = (VR step − its non-VR step) / (that all-reduce).
   The first call of each step (tracing, and XLA compiles where used) is printed too. Every
   variant has the defaults (GSNR's maths: XLA where it works). ``--fused`` adds ``lamb``,
   ``vr-lamb`` (rule and transform) and ``GSNR(AdamW)`` with ``fused=True`` (each variable's
   maths as one XLA program) and ``vr-lamb``, ``GSNR(AdamW)`` with ``fused=False`` throughout
   ("-plain"), each as a ratio to its default variant, and times the optimizer's ``apply``
   alone for each of them, on the model's variables and fixed gradients (no forward/backward,
   no all-reduce):

    horovodrun -np 2 -H localhost:2 --gloo .venv/bin/python bench/real_shapes_tf.py --fused

2. Peak memory (RSS of rank 0, one horovodrun -np 2 per variant, 3 steps), ratio to the
   AdamW baseline:

    .venv/bin/python bench/real_shapes_tf.py --memory
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings

from _timing import time_rounds

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore", message="hvd_lb: GSNR from k")

KINDS = ["sgd", "adamw", "lamb", "vr-lamb-f32", "vr-lamb-bf16", "gsnr-adamw-f32", "gsnr-adamw-bf16"]
# variant → the default variant it is compared with ("-fused": fused=True, "-plain": fused=False throughout)
FUSED = {"lamb-fused": "lamb", "vr-lamb-f32-fused": "vr-lamb-f32", "vr-lamb-f32-plain": "vr-lamb-f32",
         "gsnr-adamw-f32-fused": "gsnr-adamw-f32", "gsnr-adamw-f32-plain": "gsnr-adamw-f32"}
MEM_KINDS = ["sgd", "adamw", "lamb", "vr-lamb-f32", "vr-lamb-bf16", "gsnr-adamw-f32"]


def build(name, seed=0):
    import keras
    keras.utils.set_random_seed(seed)
    L = keras.layers
    if name == "resnet18":
        def block(x, cout, stride):
            y = L.Conv2D(cout, 3, stride, padding="same", use_bias=False)(x)
            y = L.ReLU()(L.BatchNormalization()(y))
            y = L.BatchNormalization()(L.Conv2D(cout, 3, 1, padding="same", use_bias=False)(y))
            if stride != 1 or x.shape[-1] != cout:
                x = L.BatchNormalization()(L.Conv2D(cout, 1, stride, use_bias=False)(x))
            return L.ReLU()(L.Add()([x, y]))

        inp = keras.Input((32, 32, 3))
        x = L.ReLU()(L.BatchNormalization()(L.Conv2D(64, 3, padding="same", use_bias=False)(inp)))
        for cout, stride in ((64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)):
            x = block(x, cout, stride)
        return keras.Model(inp, L.Dense(10)(L.GlobalAveragePooling2D()(x)))
    d, vocab = 256, 8000
    inp = keras.Input((64,), dtype="int32")
    x = L.Embedding(vocab, d)(inp)
    for _ in range(4):
        x = L.LayerNormalization()(L.Add()([x, L.MultiHeadAttention(8, d // 8)(x, x)]))
        y = L.Dense(d)(L.Dense(4 * d, activation="relu")(x))
        x = L.LayerNormalization()(L.Add()([x, y]))
    return keras.Model(inp, L.Dense(vocab)(x))


def batch(name, n, seed):
    import numpy as np
    import tensorflow as tf
    rng = np.random.default_rng(seed)
    if name == "resnet18":
        return (tf.constant(rng.normal(size=(n, 32, 32, 3)), tf.float32),
                tf.constant(rng.integers(0, 10, size=n)))
    return (tf.constant(rng.integers(0, 8000, size=(n, 64)), tf.int32),
            tf.constant(rng.integers(0, 8000, size=(n, 64))))


def bare_optimizer(kind):
    import keras
    import hvd_lb.tf as H
    fused = {"-fused": True, "-plain": False}.get(kind[kind.rfind("-"):])  # None: the default
    if kind == "sgd":
        return keras.optimizers.SGD(0.01, momentum=0.9)
    if kind == "adamw":
        return keras.optimizers.AdamW(1e-3, weight_decay=0.01)
    if kind.startswith("lamb"):
        return H.create("lamb", learning_rate=1e-3, fused=bool(fused))
    if kind.startswith("vr-lamb"):
        return H.create("vr-lamb", learning_rate=1e-3, fused=bool(fused), gsnr_fused=fused)
    if kind.startswith("gsnr-adamw"):
        return H.GSNR(keras.optimizers.AdamW(1e-3, weight_decay=0.01), momentum=0.9, fused=fused)
    raise ValueError(kind)


def optimizer(kind):
    """``bare_optimizer(kind)`` behind hvd_lb's DistributedOptimizer; VR kinds send s as float32 or bf16."""
    import hvd_lb.tf as H
    vr = kind.startswith(("vr-", "gsnr-"))
    return H.DistributedOptimizer(bare_optimizer(kind),
                                  **({"square_dtype": "bfloat16" if "bf16" in kind else "float32"} if vr else {}))


def make_step(model, opt):
    from tf_step import make_step as mlp_make_step   # one compiled training step, both TF benches
    return mlp_make_step(model, opt.apply)


def kinds(args):
    return KINDS + (list(FUSED) if args.fused else [])


def timed(runs, args):
    """``time_rounds`` over ``runs`` (name → callable) between Horovod barriers.

    The XLA programs are cached per process: the caches are emptied before each variant's
    first call, so that its first step pays every trace and compile, as a fresh run does.
    """
    import tensorflow as tf
    import horovod.tensorflow as hvd
    from hvd_lb.tf import gsnr, optimizers
    cold = set(runs)

    def first_cold(k, run):
        def call():
            if k in cold:
                cold.discard(k)
                gsnr._gsnr_xla.cache_clear()
                optimizers._update_xla.cache_clear()
            run()
        return call

    return time_rounds({k: first_cold(k, run) for k, run in runs.items()},
                       lambda: hvd.allreduce(tf.constant(0.0), name="bench_barrier").numpy(),
                       args.warmup, args.iters)


def step_bench(model_name, args):
    import tensorflow as tf
    import horovod.tensorflow as hvd
    x, y = batch(model_name, args.batch, hvd.rank())
    steps, n = {}, 0
    for k in kinds(args):
        model = build(model_name)
        n = sum(int(v.shape.num_elements()) for v in model.trainable_variables)
        steps[k] = make_step(model, optimizer(k))
    grads = [tf.random.normal(v.shape) for v in build(model_name).trainable_variables]

    @tf.function
    def allreduce():
        return hvd.grouped_allreduce(grads, op=hvd.Average, name="bench_ar", ignore_name_scope=True)

    def run(k):
        out = allreduce() if k == "allreduce" else steps[k](x, y)
        tf.nest.map_structure(lambda t: t.numpy(), out)

    med, first = timed({k: (lambda k=k: run(k)) for k in kinds(args) + ["allreduce"]}, args)
    return med, first, n


def make_apply(opt, grads, squares, variables):
    """One compiled ``opt.apply`` (with s for a GSNR) on ``variables``; the call waits for it."""
    import tensorflow as tf
    import hvd_lb.tf as H
    opt.build(variables)

    @tf.function
    def apply():
        if isinstance(opt, H.GSNR):
            opt.set_grad_sq(squares)
        opt.apply(grads, variables)

    def run():
        apply()
        variables[0].numpy()
    return run


def apply_bench(model_name, args):
    """``apply`` alone, default and the ``FUSED`` variants, on the model's variables and fixed gradients."""
    import tensorflow as tf
    variables = build(model_name).trainable_variables
    grads = [tf.random.normal(v.shape, seed=i) for i, v in enumerate(variables)]
    squares = [g * g + 1.0 for g in grads]  # s ≥ ḡ², as a mean of squares is
    names = list(dict.fromkeys(k for variant, default in FUSED.items() for k in (default, variant)))
    return timed({k: make_apply(bare_optimizer(k), grads, squares, variables) for k in names}, args)


def report(model_name, med, first, n, args, workers):
    """Wall-clock medians, and CPU-time medians (time.process_time of rank 0: this process's own
    work, Horovod's background thread included; insensitive to other processes' load)."""
    ar, arc = med["allreduce"], med["allreduce@cpu"]
    print(f"\n[{model_name}, TF/Keras 3] {n / 1e6:.2f}M parameters, {workers} workers, batch {args.batch}/worker, "
          f"{args.iters} timed rounds (medians; 'cpu' = CPU time of the process)")
    print(f"  {'variant':<20} {'wall ms':>9} {'/ SGD':>7} {'/ AdamW':>8} {'cpu ms':>8} {'/ SGD':>7} {'/ AdamW':>8} "
          f"{'first step s':>13}")
    for k in kinds(args):
        c = med[k + "@cpu"]
        print(f"  {k:<20} {1e3 * med[k]:>9.1f} {med[k] / med['sgd']:>7.3f} {med[k] / med['adamw']:>8.3f} "
              f"{1e3 * c:>8.1f} {c / med['sgd@cpu']:>7.3f} {c / med['adamw@cpu']:>8.3f} {first[k]:>13.2f}")
    print(f"  one grouped all-reduce of all gradients: wall {1e3 * ar:.1f} ms ({ar / med['sgd']:.3f} of an SGD step), "
          f"cpu {1e3 * arc:.1f} ms")
    for vr, non in (("vr-lamb-f32", "lamb"), ("vr-lamb-bf16", "lamb"), ("gsnr-adamw-f32", "adamw"),
                    ("gsnr-adamw-bf16", "adamw")):
        extra, extrac = med[vr] - med[non], med[vr + "@cpu"] - med[non + "@cpu"]
        print(f"  VR extra {vr:<15}- {non:<5}: wall {1e3 * extra:7.1f} ms = {extra / ar:5.2f} x one all-reduce, "
              f"step ratio {med[vr] / med[non]:.3f} | cpu {1e3 * extrac:7.1f} ms = {extrac / arc:5.2f} x, "
              f"step ratio {med[vr + '@cpu'] / med[non + '@cpu']:.3f}")
    for variant, default in FUSED.items() if args.fused else ():
        print(f"  {default:<14} / {variant:<20}: step wall x{med[default] / med[variant]:.3f}, "
              f"cpu x{med[default + '@cpu'] / med[variant + '@cpu']:.3f} | first step {first[default]:.2f} s vs "
              f"{first[variant]:.2f} s")
    sys.stdout.flush()
    return {"model": model_name, "params": n, "workers": workers, "median_s": med, "first_s": first}


def report_apply(model_name, med, first, args):
    print(f"\n[{model_name}, TF/Keras 3] optimizer apply alone (fixed gradients; no forward/backward, no "
          f"all-reduce), {args.iters} timed rounds (medians)")
    print(f"  {'variant':<20} {'wall ms':>9} {'cpu ms':>8} {'first step s':>13}")
    for k in dict.fromkeys(k for variant, default in FUSED.items() for k in (default, variant)):
        print(f"  {k:<20} {1e3 * med[k]:>9.1f} {1e3 * med[k + '@cpu']:>8.1f} {first[k]:>13.2f}")
    for variant, default in FUSED.items():
        print(f"  {default:<14} / {variant:<20}: apply wall x{med[default] / med[variant]:.3f}, "
              f"cpu x{med[default + '@cpu'] / med[variant + '@cpu']:.3f}")
    sys.stdout.flush()
    return {"median_s": med, "first_s": first}


def run_steps(args):
    import tensorflow as tf
    import horovod.tensorflow as hvd
    hvd.init()
    tf.get_logger().setLevel("ERROR")   # each variant's step is its own tf.function: not a retrace
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    out = []
    for model_name in args.model.split(","):
        med, first, n = step_bench(model_name, args)
        if hvd.rank() == 0:
            out.append(report(model_name, med, first, n, args, hvd.size()))
        if args.fused:
            med, first = apply_bench(model_name, args)
            if hvd.rank() == 0:
                out[-1]["apply"] = report_apply(model_name, med, first, args)
    if hvd.rank() == 0 and args.json:
        json.dump(out, open(args.json, "w"), indent=1)


def mem_worker(args):
    import resource
    import tensorflow as tf
    import horovod.tensorflow as hvd
    hvd.init()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    step = make_step(build(args.model), optimizer(args.mem_worker[0]))
    x, y = batch(args.model, args.batch, hvd.rank())
    for _ in range(3):
        step(x, y).numpy()
    if hvd.rank() == 0:
        json.dump({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}, open(args.mem_worker[1], "w"))


def run_memory(args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONWARNINGS="ignore", TF_CPP_MIN_LOG_LEVEL="3")
    hvdrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    for model_name in args.model.split(","):
        print(f"\n[{model_name}, TF/Keras 3] batch {args.batch}/worker, -np 2: peak RSS of rank 0 after 3 steps")
        print(f"  {'variant':<16} {'peak MiB':>9} {'/ AdamW':>8} {'/ SGD':>8}")
        peaks = {}
        for k in MEM_KINDS:
            with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
                subprocess.run([hvdrun, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, __file__,
                                "--model", model_name, "--batch", str(args.batch), "--mem-worker", k, tmp.name],
                               env=env, check=True, capture_output=True, timeout=900)
                peaks[k] = json.load(open(tmp.name))["peak_kb"] / 1024
        for k, v in peaks.items():
            print(f"  {k:<16} {v:>9.0f} {v / peaks['adamw']:>8.3f} {v / peaks['sgd']:>8.3f}")
        sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18,transformer", help="resnet18, transformer or both")
    ap.add_argument("--batch", type=int, default=4, help="samples per worker per step")
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", help="rank 0 writes the medians here")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--fused", action="store_true",
                    help="also time lamb, vr-lamb and GSNR(AdamW) with fused=True, and the last two with fused=False")
    ap.add_argument("--mem-worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mem_worker:
        return mem_worker(args)
    if args.memory:
        return run_memory(args)
    run_steps(args)


if __name__ == "__main__":
    main()
