"""``import hvd_lb.tf.keras as hvd``: ``horovod.tensorflow.keras`` for Keras 3 (horovod#4290).

Horovod's functions that work on Keras 3 pass through (``init``, ``rank``, ``size``,
``allreduce``, ``allgather``, ``broadcast``, ``Compression``, ``Average``/``Sum``, process
sets, ``broadcast_global_variables`` (TF1 only, as Horovod's), …); the broken
ones are replaced: ``DistributedOptimizer`` (any Keras 3 optimizer, Horovod's arguments),
``callbacks``, ``load_model``, ``elastic`` (Keras 3 states and callbacks). hvd_lb's own
(``GSNR``, the rule optimizers, ``create``, …) come along.
``model.compile(..., experimental_run_tf_function=False)`` is accepted: it is Keras 2's flag,
and Keras 3's ``fit`` always steps through ``optimizer.apply``.
"""
import functools
import importlib

import keras

from .. import __dir__ as _tf_dir
from .. import __getattr__ as _tf_getattr
from .. import *  # noqa: F401,F403
from .. import __all__ as _tf_all
from ..distributed import DistributedOptimizer
from . import callbacks

_THEIRS = ("init", "shutdown", "is_initialized", "start_timeline", "stop_timeline", "size", "local_size",
           "cross_size", "rank", "local_rank", "cross_rank", "mpi_threads_supported", "mpi_enabled", "mpi_built",
           "gloo_enabled", "gloo_built", "ProcessSet", "global_process_set", "add_process_set",
           "remove_process_set", "nccl_built", "ddl_built", "ccl_built", "cuda_built", "rocm_built", "Average",
           "Sum", "Compression", "allreduce", "allgather", "broadcast", "reducescatter",
           "broadcast_global_variables")


def _horovod_keras():
    import horovod.tensorflow.keras as hk

    return hk


def __getattr__(name):
    if name == "elastic":
        return importlib.import_module(".elastic", __name__)
    if name in _THEIRS:
        return getattr(_horovod_keras(), name)
    return _tf_getattr(name)


def __dir__():
    return sorted(set(_tf_dir()) | set(_THEIRS) | {"callbacks", "load_model", "elastic"})


def load_model(filepath, custom_optimizers=None, custom_objects=None, compression="none", legacy_opts=False):
    """Horovod's ``load_model``: load a Keras model and wrap its optimizer in ``DistributedOptimizer``
    (optimizer state kept). ``custom_optimizers``: optimizer classes the file needs."""
    if legacy_opts:
        raise ValueError("invalid legacy_opts=True: Keras 3 has no legacy optimizers")
    objects = {cls.__name__: cls for cls in custom_optimizers or []}
    objects.update(custom_objects or {})
    model = keras.saving.load_model(filepath, custom_objects=objects)
    if model.optimizer is not None and not isinstance(model.optimizer, DistributedOptimizer):
        model.optimizer = DistributedOptimizer(model.optimizer, compression=compression)
    return model


def _accept_experimental_run_tf_function():
    # Patch the class that defines compile (Keras' Trainer): Keras' load_model skips compiling
    # models whose class's compile differs from Trainer.compile.
    owner = next(c for c in keras.Model.__mro__ if "compile" in vars(c))
    compile_ = owner.compile
    if getattr(compile_, "_hvd_lb", False):
        return

    @functools.wraps(compile_)
    def compile(self, *args, experimental_run_tf_function=None, **kwargs):
        optimizer = kwargs.get("optimizer", args[0] if args else None)
        if isinstance(optimizer, DistributedOptimizer) and len(args) < 8:
            # Horovod's ops have no XLA kernel; Keras 3's "auto" means XLA on GPUs.
            kwargs.setdefault("jit_compile", False)
        return compile_(self, *args, **kwargs)

    compile._hvd_lb = True
    owner.compile = compile


_accept_experimental_run_tf_function()

__all__ = list(_tf_all) + list(_THEIRS) + ["callbacks", "load_model", "elastic"]
