"""Torch benchmark on real model shapes: a ResNet-18-style CNN (32×32 input) and a small
transformer encoder. Run by hand; every figure is a ratio against a baseline measured in
the same run (round-robin over the variants, medians). Not a test.

One-time install of the comparison optimizers, into the venv only (not scripts/install.sh;
--no-deps keeps the CPU torch — timm would otherwise pull torchvision, which this script
does not need: timm's ``optim/lamb.py`` and ``optim/lars.py`` are loaded on their own):

    .venv/bin/pip install --no-deps timm pytorch-optimizer

Environment (as root): OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
PYTHONPATH=$PWD OMP_NUM_THREADS=1.

1. Full training step + optimizer step alone + fused GSNR (under horovodrun):

    horovodrun -np 2 -H localhost:2 --gloo .venv/bin/python bench/real_shapes.py [--model resnet18,transformer]

   * step time of plain ``horovod.torch.DistributedOptimizer`` + ``torch.optim.SGD(momentum)``
     and + ``torch.optim.AdamW(foreach=True)`` vs hvd_lb non-VR (``lamb``) vs VR (``vr-lamb``,
     ``GSNR(AdamW)``; s as float32 and as bfloat16), and one extra all-reduce of every
     gradient timed in the same rounds: "VR extra / one all-reduce" = (VR step − its non-VR
     step) / (that all-reduce);
   * with ``--fused``: also ``lamb`` and ``vr-lamb`` with ``fused=True`` (the rule's update and
     the GSNR maths torch.compile'd) and ``GSNR(AdamW, fused=True)``; first steps (compile) printed;
   * the optimizer step alone (no communication, the same gradients): hvd_lb ``lamb``,
     ``lars``, ``vr-lamb`` (foreach and fused), ``GSNR(AdamW)`` (foreach and fused) vs
     ``torch.optim.AdamW(foreach=True)`` and the Lamb/LARS of timm and pytorch-optimizer
     (foreach, global grad-norm clipping off as in hvd_lb's LAMB); first call printed too.

2. Peak memory (RSS of rank 0, one horovodrun -np 2 per variant, 3 steps), ratio to plain
   Horovod + AdamW:

    .venv/bin/python bench/real_shapes.py --memory

3. Scaling: step time of vr-lamb vs lamb measured at -np 1, 2, 4 on this machine (every
   variant with 2 micro-batches per step so that -np 1 has k = 2 samples), and the bytes on
   the wire per step vs workers up to 768 (analytic, ``rules.square_wire_dtype``):

    .venv/bin/python bench/real_shapes.py --scaling [--model resnet18]
    .venv/bin/python bench/real_shapes.py --bytes        # the analytic table only

4. The square options (issue 20), under horovodrun -np 2 and -np 4: step time of VR with
   float32 s, float16 s, gsnr_interval 4 and both, against plain Horovod + AdamW, and the bytes
   each worker sent per step (its /proc/self/io ``wchar`` around 3 steps of each variant):

    horovodrun -np 2 -H localhost:2 --gloo .venv/bin/python bench/real_shapes.py --squares
"""
import argparse
import copy
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings

from _timing import horovod_torch_rounds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore", message="hvd_lb: GSNR from k")


# --- models -------------------------------------------------------------------------------

def build(name, seed=0):
    import torch
    import torch.nn as nn
    torch.manual_seed(seed)
    if name == "resnet18":
        class Block(nn.Module):
            def __init__(self, cin, cout, stride):
                super().__init__()
                self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
                self.b1 = nn.BatchNorm2d(cout)
                self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
                self.b2 = nn.BatchNorm2d(cout)
                self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                              if stride != 1 or cin != cout else nn.Identity())

            def forward(self, x):
                y = torch.relu(self.b1(self.c1(x)))
                return torch.relu(self.b2(self.c2(y)) + self.short(x))

        blocks, cin = [], 64
        for cout, stride in ((64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)):
            blocks.append(Block(cin, cout, stride))
            cin = cout
        return nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), *blocks,
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))

    class Encoder(nn.Module):
        def __init__(self, vocab=8000, d=256, layers=4):
            super().__init__()
            self.emb = nn.Embedding(vocab, d)
            layer = nn.TransformerEncoderLayer(d_model=d, nhead=8, dim_feedforward=4 * d, batch_first=True,
                                               dropout=0.0)
            self.enc = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
            self.head = nn.Linear(d, vocab)

        def forward(self, x):
            return self.head(self.enc(self.emb(x)))

    return Encoder()


def batch(name, n, seed):
    import torch
    g = torch.Generator().manual_seed(seed)
    if name == "resnet18":
        return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    x = torch.randint(0, 8000, (n, 64), generator=g)
    return x, torch.randint(0, 8000, (n, 64), generator=g)


def loss_of(name, model, x, y):
    import torch.nn.functional as F
    out = model(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


# --- optimizers ---------------------------------------------------------------------------

def timm_optim(cls):
    """timm's Lamb/Lars without importing timm (whose __init__ needs torchvision)."""
    if "timm.optim" not in sys.modules:
        from importlib import util as _util
        spec = _util.find_spec("timm")
        if spec is None:
            return None
        base = os.path.dirname(spec.origin)
        for name, path in (("timm", base), ("timm.optim", os.path.join(base, "optim"))):
            mod = types.ModuleType(name)
            mod.__path__ = [path]
            sys.modules[name] = mod
    return getattr(importlib.import_module("timm.optim." + cls.lower()), cls)


def po_optim(cls):
    try:
        return getattr(importlib.import_module("pytorch_optimizer"), cls)
    except ImportError:
        return None


def plain_optimizer(kind, model, lr=1e-3):
    """Single-process optimizer for ``kind`` (no Horovod)."""
    import torch
    import hvd_lb.torch as lbt
    ps = [p for p in model.parameters()]
    if kind == "sgd":
        return torch.optim.SGD(ps, lr=0.01, momentum=0.9)
    if kind == "adamw":
        return torch.optim.AdamW(ps, lr=lr, weight_decay=0.01, foreach=True)
    if kind in ("gsnr-adamw", "gsnr-adamw-fused"):
        return lbt.GSNR(torch.optim.AdamW(ps, lr=lr, weight_decay=0.01, foreach=True), momentum=0.9,
                        fused=kind.endswith("fused"))
    if kind in ("lamb-fused", "vr-lamb-fused", "adam-fused"):
        return lbt.create(kind[:-6], model, lr=lr, fused=True)   # the rule's update and GSNR compiled
    if kind in ("lamb", "lars", "vr-lamb"):
        return lbt.create(kind, model, lr=lr, foreach=True)
    if kind == "timm-lamb":
        return timm_optim("Lamb")(ps, lr=lr, weight_decay=0.01, max_grad_norm=None, foreach=True)
    if kind == "timm-lars":
        return timm_optim("Lars")(ps, lr=lr, momentum=0.9, weight_decay=1e-4, foreach=True)
    if kind == "po-lamb":
        return po_optim("Lamb")(ps, lr=lr, weight_decay=0.01, max_grad_norm=0.0, foreach=True)
    if kind == "po-lars":
        return po_optim("LARS")(ps, lr=lr, momentum=0.9, weight_decay=1e-4, foreach=True)
    raise ValueError(kind)


# --- 1. full step, under horovodrun -------------------------------------------------------

STEP_KINDS = ["hvd-sgd", "hvd-adamw", "lamb", "vr-lamb-f32", "vr-lamb-bf16", "gsnr-adamw-f32",
              "gsnr-adamw-bf16"]
SOLO_KINDS = ["adamw", "lamb", "lamb-fused", "lars", "vr-lamb", "vr-lamb-fused", "gsnr-adamw", "gsnr-adamw-fused",
              "timm-lamb", "timm-lars", "po-lamb", "po-lars"]


def distributed(kind, model, micro_batches=1):
    import torch
    import horovod.torch as hvd
    import hvd_lb.torch as lbt
    named = list(model.named_parameters())
    if kind in ("hvd-sgd", "hvd-adamw"):
        return hvd.DistributedOptimizer(plain_optimizer(kind[4:], model), named_parameters=named,
                                        backward_passes_per_step=micro_batches)
    extra = {}
    if "-n4" in kind:
        extra["gsnr_interval"] = 4
        kind = kind.replace("-n4", "")
    sq = {"bf16": "bfloat16", "f16": "float16"}.get(kind.rsplit("-", 1)[-1], "float32")
    kind = kind.replace("-f16", "-f32")
    if kind.startswith("gsnr-adamw"):
        opt = plain_optimizer("gsnr-adamw-fused" if "fused" in kind else "gsnr-adamw", model)
    elif kind.endswith("-fused"):
        opt = plain_optimizer(kind, model)                 # the rule's update and GSNR compiled
    else:
        opt = lbt.create(kind.split("-f32")[0].split("-bf16")[0], model, lr=1e-3, foreach=True)
    return lbt.DistributedOptimizer(opt, named_parameters=named, backward_passes_per_step=micro_batches,
                                    square_dtype=sq if kind.startswith(("vr-", "gsnr-")) else None, **extra)


def step_bench(model_name, kinds, args, micro_batches=1):
    """Round-robin step times (s) of ``kinds`` + one all-reduce of every gradient; first steps."""
    import torch
    import horovod.torch as hvd
    base = build(model_name)
    x, y = batch(model_name, args.batch, hvd.rank())
    xs = list(zip(x.chunk(micro_batches), y.chunk(micro_batches)))
    setups = {}
    for k in kinds:
        m = copy.deepcopy(base)
        setups[k] = (m, distributed(k, m, micro_batches))
    grads = [torch.randn_like(p) for p in base.parameters()]

    def train(k):
        m, opt = setups[k]
        opt.zero_grad()
        for xm, ym in xs:
            loss_of(model_name, m, xm, ym).backward()
        opt.step()

    med, first = horovod_torch_rounds({k: (lambda k=k: train(k)) for k in kinds}, grads, args.warmup, args.iters)
    n = sum(p.numel() for p in base.parameters())
    if getattr(args, "squares", False):
        # Bytes this process wrote (Gloo's sockets included) per step, each variant alone:
        # 4 steps (a multiple of gsnr_interval 4), between barriers.
        for k in kinds:
            hvd.allreduce(torch.zeros(1), name="bench.bytes.barrier")
            w0 = _wchar()
            for _ in range(4):
                train(k)
            med[k + "@bytes"] = (_wchar() - w0) / 4
    return med, first, n


def _wchar():
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


SQUARE_KINDS = ["hvd-adamw", "gsnr-adamw-f32", "gsnr-adamw-f16", "gsnr-adamw-f32-n4", "gsnr-adamw-f16-n4",
                "lamb", "vr-lamb-f32", "vr-lamb-f16", "vr-lamb-f32-n4"]


def run_squares(args):
    import torch
    import horovod.torch as hvd
    hvd.init()
    torch.set_num_threads(1)
    out = []
    for model_name in args.model.split(","):
        med, first, n = step_bench(model_name, SQUARE_KINDS, args)
        if hvd.rank() != 0:
            continue
        W, a, ab = hvd.size(), med["hvd-adamw"], med["hvd-adamw@bytes"]
        print(f"\n[{model_name}] {n / 1e6:.2f}M parameters, -np {W}, batch {args.batch}/worker, {args.iters} "
              f"rounds (medians); one all-reduce of every gradient {1e3 * med['allreduce']:.1f} ms")
        print("| variant | step ms | / hvd+AdamW | cpu / hvd+AdamW | sent MB/step | bytes / hvd+AdamW |")
        print("| --- | --- | --- | --- | --- | --- |")
        for k in SQUARE_KINDS:
            print(f"| {k} | {1e3 * med[k]:.1f} | {med[k] / a:.3f} | {med[k + '@cpu'] / med['hvd-adamw@cpu']:.3f} "
                  f"| {med[k + '@bytes'] / 1e6:.1f} | {med[k + '@bytes'] / ab:.3f} |")
        out.append({"model": model_name, "params": n, "workers": W, "median_s": med, "first_s": first})
        sys.stdout.flush()
    if hvd.rank() == 0 and args.json:
        json.dump(out, open(args.json, "w"), indent=1)


def solo_bench(model_name, args):
    """Optimizer step alone on fixed gradients (and s for the VR ones), variant by variant."""
    import torch
    base = build(model_name)
    runs, first = {}, {}
    for k in SOLO_KINDS:
        m = copy.deepcopy(base)
        try:
            opt = plain_optimizer(k, m)
        except (TypeError, AttributeError) as e:   # a comparison package missing
            print(f"  (skipping {k}: {e})", file=sys.stderr)
            continue
        if opt is None:
            continue
        ps = [p for g in opt.param_groups for p in g["params"]]
        gen = torch.Generator().manual_seed(1)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        sq = [p.grad * p.grad * 2.0 for p in ps]

        def run(opt=opt, sq=sq):
            if hasattr(opt, "set_grad_sq"):
                opt.set_grad_sq(sq)
            opt.step()
        runs[k] = run
    times = {k: [] for k in runs}
    # One variant's steps back to back, as in a training process: interleaving variants would
    # let one reuse the heap another freed (on CPU, page faults are a large part of a step).
    for k, run in runs.items():
        for it in range(args.warmup + args.iters):
            t0, c0 = time.perf_counter(), time.thread_time()
            run()
            dt = time.perf_counter() - t0
            # Single-threaded, no communication: this thread's CPU time is immune to the load of
            # other processes; the first call is wall time (compile included).
            if it > 0:
                dt = time.thread_time() - c0
            if it == 0:
                first[k] = dt
            if it >= args.warmup:
                times[k].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}, first


def report_steps(model_name, med, first, n, args, workers):
    """Wall-clock medians, and CPU-time medians (time.process_time of rank 0: this process's own
    work, including Horovod's background thread; insensitive to other processes' load)."""
    ar, arc = med["allreduce"], med["allreduce@cpu"]
    print(f"\n[{model_name}] {n / 1e6:.2f}M parameters, {workers} workers, batch {args.batch}/worker, "
          f"{args.iters} timed rounds (medians; 'cpu' = CPU time of the process)")
    print(f"  {'variant':<18} {'wall ms':>9} {'/ hvd+SGD':>10} {'/ hvd+AdamW':>12} {'cpu ms':>8} "
          f"{'/ hvd+SGD':>10} {'/ hvd+AdamW':>12} {'first step s':>13}")
    for k in med:
        if k.startswith("allreduce") or k.endswith("@cpu"):
            continue
        c = med[k + "@cpu"]
        print(f"  {k:<18} {1e3 * med[k]:>9.1f} {med[k] / med['hvd-sgd']:>10.3f} {med[k] / med['hvd-adamw']:>12.3f} "
              f"{1e3 * c:>8.1f} {c / med['hvd-sgd@cpu']:>10.3f} {c / med['hvd-adamw@cpu']:>12.3f} {first[k]:>13.2f}")
    print(f"  one all-reduce of all gradients: wall {1e3 * ar:.1f} ms ({ar / med['hvd-sgd']:.3f} of a hvd+SGD step), "
          f"cpu {1e3 * arc:.1f} ms")
    pairs = [(k, "lamb-fused" if k.endswith("fused") else "lamb") for k in med
             if k.startswith("vr-lamb") and not k.endswith("@cpu")] + \
            [(k, "hvd-adamw") for k in med if k.startswith("gsnr-adamw") and not k.endswith("@cpu")]
    for vr, non in pairs:
        extra, extrac = med[vr] - med[non], med[vr + "@cpu"] - med[non + "@cpu"]
        print(f"  VR extra {vr:<17}- {non:<9}: wall {1e3 * extra:7.1f} ms = {extra / ar:5.2f} x one all-reduce, "
              f"step ratio {med[vr] / med[non]:.3f} | cpu {1e3 * extrac:7.1f} ms = {extrac / arc:5.2f} x, "
              f"step ratio {med[vr + '@cpu'] / med[non + '@cpu']:.3f}")
    return {"model": model_name, "params": n, "workers": workers, "median_s": med, "first_s": first}


def report_solo(model_name, med, first):
    a = med["adamw"]
    ref = [med[k] for k in ("timm-lamb", "po-lamb") if k in med]
    print(f"  optimizer step alone (no communication; medians of thread CPU time), ratio to AdamW(foreach) "
          f"{1e3 * a:.1f} ms:")
    for k, v in med.items():
        extra = f"   / fastest other Lamb {v / min(ref):.3f}" if k == "lamb" and ref else ""
        print(f"    {k:<18} {1e3 * v:8.1f} ms  {v / a:6.3f}x   first call (wall) {first[k]:7.2f} s{extra}")
    for k in ("vr-lamb", "gsnr-adamw"):
        if k + "-fused" in med:
            save = med[k] - med[k + "-fused"]
            pays = f"pays back after {first[k + '-fused'] / save:.0f} steps" if save > 0 else "never pays back"
            print(f"    {k}: foreach / fused = {med[k] / med[k + '-fused']:.2f}; fused first call "
                  f"{first[k + '-fused']:.1f} s (compile, once per process: the first fused variant pays it); "
                  f"{pays}")


def run_steps(args):
    import torch
    import horovod.torch as hvd
    hvd.init()
    torch.set_num_threads(1)
    kinds = STEP_KINDS + (["lamb-fused", "vr-lamb-fused", "gsnr-adamw-fused"] if args.fused else [])
    out = []
    for model_name in args.model.split(","):
        med, first, n = step_bench(model_name, kinds, args)
        solo = solo_bench(model_name, args) if not args.no_solo else None
        if hvd.rank() == 0:
            res = report_steps(model_name, med, first, n, args, hvd.size())
            if solo:
                report_solo(model_name, *solo)
                res["solo_s"], res["solo_first_s"] = solo
            out.append(res)
            sys.stdout.flush()
    if hvd.rank() == 0 and args.json:
        json.dump(out, open(args.json, "w"), indent=1)


# --- 2. peak memory -----------------------------------------------------------------------

MEM_KINDS = ["hvd-sgd", "hvd-adamw", "lamb", "vr-lamb-f32", "vr-lamb-bf16", "gsnr-adamw-f32", "vr-lamb-fused"]


def mem_worker(args):
    import resource
    import torch
    import horovod.torch as hvd
    hvd.init()
    torch.set_num_threads(1)
    model = build(args.model)
    opt = distributed(args.mem_worker[0], model)
    x, y = batch(args.model, args.batch, hvd.rank())
    for _ in range(3):
        opt.zero_grad()
        loss_of(args.model, model, x, y).backward()
        opt.step()
    if hvd.rank() == 0:
        json.dump({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}, open(args.mem_worker[1], "w"))


def horovodrun(np_, extra, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONWARNINGS="ignore")
    hvdrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    cmd = [hvdrun, "-np", str(np_), "-H", f"localhost:{np_}", "--gloo", sys.executable, __file__] + extra
    return subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=timeout)


def run_memory(args):
    for model_name in args.model.split(","):
        n = sum(p.numel() for p in build(model_name).parameters())
        print(f"\n[{model_name}] {n / 1e6:.2f}M parameters ({n * 4 / 2 ** 20:.0f} MiB float32), batch "
              f"{args.batch}/worker, -np 2: peak RSS of rank 0 after 3 steps")
        print(f"  {'variant':<16} {'peak MiB':>9} {'/ hvd+AdamW':>12} {'/ hvd+SGD':>10}")
        peaks = {}
        for k in MEM_KINDS:
            with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
                horovodrun(2, ["--model", model_name, "--batch", str(args.batch), "--mem-worker", k, tmp.name])
                peaks[k] = json.load(open(tmp.name))["peak_kb"] / 1024
        for k, v in peaks.items():
            print(f"  {k:<16} {v:>9.0f} {v / peaks['hvd-adamw']:>12.3f} {v / peaks['hvd-sgd']:>10.3f}")
        sys.stdout.flush()


# --- 3. scaling ---------------------------------------------------------------------------

def wire_table(sizes=(("resnet18", None), ("transformer", None))):
    """Bytes each worker receives per step (ring all-reduce / all-gather lower bounds)."""
    from hvd_lb import rules
    counts = [(name, sum(p.numel() for p in build(name).parameters())) for name, _ in sizes]
    print("\nBytes on the wire per step, received by each worker (analytic; ring all-reduce of N float32 "
          "values: 2(W-1)/W·4N bytes; all-gather of bf16: 2(W-1)·N). "
          "non-VR = ḡ only; VR = ḡ and s in one grouped all-reduce; 'bf16 asked' follows "
          "rules.square_wire_dtype (all-gather only for W ≤ 3, float32 otherwise); 'bf16 forced' = what an "
          "all-gather would cost without that rule (its s part alone: W/4 × a float32 all-reduce of s). "
          "W = 1 sends nothing.")
    for name, n in counts:
        print(f"  [{name}] N = {n / 1e6:.2f}M")
        print(f"  {'W':>4} {'non-VR MB':>10} {'VR f32 MB':>10} {'x non-VR':>9} {'bf16 asked MB':>14} "
              f"{'x non-VR':>9} {'wire':>9} {'bf16 forced MB':>15} {'x non-VR':>9}")
        for w in (2, 3, 4, 8, 16, 64, 256, 768):
            ar = 2 * (w - 1) / w * 4 * n
            vr = 2 * ar
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wire = rules.square_wire_dtype("bfloat16", w)
            forced = ar + 2 * (w - 1) * n
            asked = forced if wire == "bfloat16" else vr
            r = (lambda b: b / ar)
            print(f"  {w:>4} {ar / 1e6:>10.1f} {vr / 1e6:>10.1f} {r(vr):>9.2f} {asked / 1e6:>14.1f} {r(asked):>9.2f} "
                  f"{wire:>9} {forced / 1e6:>15.1f} {r(forced):>9.2f}")


def run_scaling(args):
    print(f"[{args.model}] scaling on this machine ({os.cpu_count()} cores): lamb vs vr-lamb (float32 s), "
          f"2 micro-batches of {args.batch // 2} per worker per step, medians of {args.iters} rounds")
    print(f"  {'-np':>4} {'lamb ms':>9} {'vr-lamb ms':>11} {'VR/non-VR':>10} {'(cpu)':>10} {'all-reduce ms':>14} "
          f"{'VR extra / all-reduce':>24}")
    for np_ in (1, 2, 4):
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            horovodrun(np_, ["--model", args.model, "--batch", str(args.batch), "--iters", str(args.iters),
                             "--warmup", str(args.warmup), "--scale-worker", tmp.name])
            med = json.load(open(tmp.name))
        extra = med["vr-lamb-f32"] - med["lamb"]
        extrac = med["vr-lamb-f32@cpu"] - med["lamb@cpu"]
        ratio = f"{extra / med['allreduce']:.2f} (cpu {extrac / med['allreduce@cpu']:.2f})" if np_ > 1 else "-"
        print(f"  {np_:>4} {1e3 * med['lamb']:>9.1f} {1e3 * med['vr-lamb-f32']:>11.1f} "
              f"{med['vr-lamb-f32'] / med['lamb']:>10.3f} {med['vr-lamb-f32@cpu'] / med['lamb@cpu']:>10.3f} "
              f"{1e3 * med['allreduce']:>14.1f} {ratio:>24}")
        sys.stdout.flush()
    wire_table()


def scale_worker(args):
    import torch
    import horovod.torch as hvd
    hvd.init()
    torch.set_num_threads(1)
    med, _, _ = step_bench(args.model, ["lamb", "vr-lamb-f32"], args, micro_batches=2)
    if hvd.rank() == 0:
        json.dump(med, open(args.scale_worker, "w"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="resnet18, transformer or both, comma-separated")
    ap.add_argument("--batch", type=int, default=4, help="samples per worker per step")
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--fused", action="store_true", help="also the full step with GSNR(AdamW, fused=True)")
    ap.add_argument("--no-solo", action="store_true", help="skip the optimizer-step-alone table")
    ap.add_argument("--json", help="rank 0 writes the medians here")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--scaling", action="store_true")
    ap.add_argument("--bytes", action="store_true")
    ap.add_argument("--squares", action="store_true", help="float16 squares / gsnr_interval vs hvd+AdamW")
    ap.add_argument("--mem-worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--scale-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        args.model = "resnet18" if args.scaling or args.scale_worker else "resnet18,transformer"
    if args.mem_worker:
        return mem_worker(args)
    if args.scale_worker:
        return scale_worker(args)
    if args.memory:
        return run_memory(args)
    if args.scaling:
        return run_scaling(args)
    if args.bytes:
        return wire_table()
    if args.squares:
        return run_squares(args)
    run_steps(args)


if __name__ == "__main__":
    main()
