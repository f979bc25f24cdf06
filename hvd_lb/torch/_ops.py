"""torch helpers of the kernels: the ops namespace ``B`` that lets ``hvd_lb.formulas`` run on
torch tensors, per-parameter scratch buffers, CPU ``out=`` kernels, and the calling
conventions of the ``torch.compile``d (``fused``) kernels."""
from __future__ import annotations

import contextlib
import functools
import shutil
import types

import torch
import torch._inductor.config
import torch.fx.experimental._config
from torch.utils.weak import WeakIdKeyDictionary

_SCRATCH = WeakIdKeyDictionary()  # parameter → {(tag, dtype): buffer}


def _is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


class TorchOps:
    """``B`` for torch tensors; scalar arguments go through clamp so no tensor is built for them."""

    square = staticmethod(torch.square)
    sqrt = staticmethod(torch.sqrt)
    exp = staticmethod(torch.exp)
    mean = staticmethod(torch.mean)
    where = staticmethod(torch.where)
    ones_like = staticmethod(torch.ones_like)
    zeros_like = staticmethod(torch.zeros_like)
    logical_and = staticmethod(torch.logical_and)

    @staticmethod
    def maximum(x, y):
        return torch.maximum(x, y) if _is_tensor(y) else torch.clamp_min(x, y)

    @staticmethod
    def minimum(x, y):
        return torch.minimum(x, y) if _is_tensor(y) else torch.clamp_max(x, y)

    @staticmethod
    def clip(x, lo, hi):
        return torch.clamp(x, lo, hi)

    @staticmethod
    def norm(x):
        return torch.linalg.vector_norm(x)

    @staticmethod
    def cast_like(x, like):
        return x.to(like.dtype)


T = TorchOps


def scratch(params, dtypes=None, tag=""):
    """One reusable buffer per parameter (and dtype and ``tag``), for a step's temporaries.

    A step then allocates no parameter-sized tensor: on CPU (glibc) a fresh buffer of a
    few MB is mapped and page-faulted anew every step, which costs more than several
    passes over memory (``bench/real_shapes.py``). A buffer without ``tag`` is used only
    within one kernel call; it lives as long as its parameter.
    """
    out = []
    for i, p in enumerate(params):
        dtype = p.dtype if dtypes is None else dtypes[i]
        bufs = _SCRATCH.setdefault(p, {})
        b = bufs.get((tag, dtype))
        if b is None or b.shape != p.shape or b.device != p.device:
            b = bufs[tag, dtype] = torch.empty_like(p, dtype=dtype)
        out.append(b)
    return out


def out_kernels(device) -> bool:
    """Per-tensor ``out=`` kernels on CPU (one pass each, nothing allocated: foreach ops have
    no real out= there, only a copy); foreach (few launches) on accelerators."""
    return device.type == "cpu"


def mul_into(out, a, b) -> None:
    """out ← a·b per tensor, ``b`` a list of tensors or of scalars (see ``out_kernels``)."""
    if out_kernels(out[0].device):
        for o, x, y in zip(out, a, b):
            torch.mul(x, y, out=o)
    else:
        torch._foreach_copy_(out, a)
        torch._foreach_mul_(out, b)


def flat(*tensors):
    """1-d views of the tensors' memory (one compiled graph for every rank and size), else as is.

    Contiguous tensors, or dense ones that share one layout (``channels_last`` gradients, state
    and scratch built ``like`` them): the kernels are element-wise maths and whole-tensor
    reductions, which do not see the order of the elements. Detached, so no ``_base``: Dynamo
    guards a view's base shape too (duck-sized: a 3×3 kernel's equal sizes became a guard
    that the next shape failed, one graph per layout).
    """
    if all(t.is_contiguous() for t in tensors):
        return [t.view(-1).detach() for t in tensors]
    order = sorted(range(tensors[0].dim()), key=lambda d: -tensors[0].stride(d))  # memory order
    views = [t.permute(order) for t in tensors]
    if all(v.is_contiguous() for v in views):
        return [v.view(-1).detach() for v in views]
    return list(tensors)


def graph_scalar(value, device, cache):
    """A value that changes between steps (t, lr) as a float64 0-d tensor graph input.

    Every other float reaches a ``torch.compile``d kernel as a constant of the graph (see
    ``specialized_floats``); a Python float here would recompile every step. ``cache`` is one
    per role (t, lr), so that two roles never share one input tensor.
    """
    if isinstance(value, torch.Tensor):
        return value
    key = (float(value), device)
    if key not in cache:
        cache[key] = torch.tensor(float(value), dtype=torch.float64, device=device)
    return cache[key]


@contextlib.contextmanager
def specialized_floats():
    """Context for calling ``compile_kernel``s: constants in, one graph for every size, no silent eager.

    * Python floats become constants of the graph: torch 2.13 otherwise turns them into 0-d
      tensor inputs, and Inductor (CPU) then mixed up such scalar inputs in the GSNR and Adam
      kernels (wrong results, caught by tests/test_torch_fused.py); hyperparameters are fixed
      per param group, so constants cost one graph per group (``compile_kernel``'s key).
    * ``backed_size_oblivious``: Dynamo would specialise sizes 0 and 1 (a 0-d or 1-element
      tensor, flattened) into graphs of their own; oblivious, one graph serves every size.
    * ``fail_on_recompile_limit_hit``: past the recompile limit (8 graphs per code object)
      Dynamo would run the kernel eagerly for the rest of the process, silently; it raises.
    * ``compile_threads=1``: each kernel is one small C++ file, compiled in this process.
      Inductor's pool of compile subprocesses costs seconds to start in every rank, and a
      DDP rank once died under it (SIGABRT, "terminate called without an active exception",
      cold cache, 2 busy cores; not reproduced in 6 more runs).
    """
    with torch._dynamo.config.patch(specialize_float=True, fail_on_recompile_limit_hit=True), \
            torch.fx.experimental._config.patch(backed_size_oblivious=True), \
            torch._inductor.config.patch(compile_threads=1):
        try:
            yield
        except torch._dynamo.exc.FailOnRecompileLimitHit as e:
            raise RuntimeError(f"torch.compile'd kernel: a kernel needed more than {torch._dynamo.config.recompile_limit} "
                               "compiled graphs (one per dtype, device and rank of non-contiguous "
                               "inputs); use fused=False (foreach) for these parameters") from e


# Distinct constants keys one kernel may compile for: each is a compile of seconds, so a group
# whose hyperparameters change every step (a scheduler on momentum or betas) must be an error.
KEYS_PER_KERNEL = 16
_KEYS: dict = {}


class KernelLimit(RuntimeError):
    """``compile_kernel`` refused a new set of hyperparameters (nothing was compiled)."""


def compile_kernel(fn, key=()):
    """``_compile_copy(fn, key)``, refusing a kernel that would compile for ever more constants."""
    keys = _KEYS.setdefault(fn, set())
    if key not in keys:
        if len(keys) >= KEYS_PER_KERNEL:
            raise KernelLimit(
                f"torch.compile'd kernel: {fn.__name__} would compile for a {len(keys) + 1}th set of hyperparameters "
                f"{key}: each value of a hyperparameter other than lr is a compiled kernel, so one that "
                "changes every step (e.g. OneCycleLR's cycle_momentum) recompiles every step; use "
                "fused=False, or schedule lr only")
        keys.add(key)
    return _compile_copy(fn, key)


@functools.lru_cache(maxsize=None)
def _compile_copy(fn, key=()):
    """``fn`` through ``torch.compile`` (Inductor: C++ on CPU, Triton on GPU), one copy per ``key``.

    ``key``: the constants ``fn`` is called with (hyperparameters of a group). Dynamo counts its
    recompile limit per code object, so each key gets its own copy of ``fn``'s code: its graphs
    are one per dtype/device, however many groups and optimizers the process builds.
    ``dynamic=True``: one graph for every size (inputs flattened, ``flat``); ``fullgraph``: a
    graph break is an error, not a kernel split in pieces. Call it inside ``specialized_floats``.
    """
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return torch.compile(copy, dynamic=True, fullgraph=True)


@functools.lru_cache(maxsize=None)
def compiler_present(device_type: str) -> bool:
    """Whether ``gsnr_fused=None`` (auto) compiles on ``device_type``: CPU, with Inductor's C++
    compiler found. CUDA (Triton) stays on foreach unless ``gsnr_fused=True``: the tests that
    hold the kernel equal to the formulas have run on CPU only (no GPU was lent)."""
    if device_type != "cpu" or not torch._dynamo.is_dynamo_supported():
        return False
    from torch._inductor import cpp_builder
    try:
        return shutil.which(cpp_builder.get_cpp_compiler()) is not None
    except Exception:  # no compiler found: Inductor raises while looking
        return False


def run_closure(closure):
    """``closure()`` with gradients on (steps run under ``no_grad``), as torch.optim does; None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def real_view(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as its real view (..., 2): re and im are two real elements, as in torch.optim."""
    return torch.view_as_real(t) if t.is_complex() else t


NARROW = (torch.float16, torch.bfloat16)


def state_dtype(p: torch.Tensor) -> torch.dtype:
    """16-bit parameters keep float32 state and step in float32 (as Keras does): fp16 second
    moments underflow below 6e-8 and bf16 rounds 1 − β₂ to 0."""
    return torch.float32 if p.dtype in NARROW else p.dtype


def keep_wide_state(opt, state_dict, keys=None) -> None:
    """After ``load_state_dict``: the saved float32 state of 16-bit parameters, not torch's cast of it."""
    ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in zip(ids, params):
        if p.dtype not in NARROW:
            continue
        for k, v in state_dict["state"].get(i, {}).items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and (keys is None or k in keys):
                opt.state[p][k] = v.to(device=p.device, dtype=torch.float32, copy=True)
