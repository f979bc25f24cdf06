"""Keras 3 elastic Horovod with hvd_lb (issue 18, item 4): Horovod's two TF2 elastic examples,
changed only in the import line (and data/length, see their headers), grow 2 → 3 and shrink
3 → 2 on localhost with every rank holding the same model and optimizer state, GSNR's included."""
import collections
import subprocess
import time

import pytest

from tests.hvdrun import ROOT, elastic_horovodrun
from tests.test_elastic import _rows

SCRIPTS = ROOT / "tests" / "scripts"
PROBE = SCRIPTS / "tf_elastic_probe.py"


def _wait(out_dir, proc, pred, what, timeout=90):
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if pred(_rows(out_dir)):
            return
        time.sleep(0.3)
    how = "job ended" if proc.poll() is not None else "timed out"
    proc.kill()
    pytest.fail(f"{how} waiting for {what}: {(out_dir / 'job.log').read_text()[-4000:]}")


def _grow_and_shrink(tmp_path, script, *probe_args):
    """Run ``script`` under elastic horovodrun (2 → 3 → 2 workers); return the probe's rows."""
    # Output to a file: Keras progress bars would fill a pipe that nobody reads while we wait.
    with open(tmp_path / "job.log", "w") as log:
        proc, hosts = elastic_horovodrun(tmp_path, [PROBE, SCRIPTS / script, tmp_path, *probe_args], cwd=tmp_path,
                                         stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(tmp_path, proc, lambda rows: sum(r["size"] == 2 for r in rows) >= 4, "2 commits on 2 workers")
        hosts.write_text("localhost:3\n")
        _wait(tmp_path, proc, lambda rows: sum(r["size"] == 3 and r["rank"] == 0 for r in rows) >= 3,
              "3 commits on 3 workers")
        hosts.write_text("localhost:2\n")
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, (tmp_path / "job.log").read_text()[-4000:]
    return _rows(tmp_path)


def _check_identical(rows):
    sizes = [r["size"] for r in rows if r["rank"] == 0 and not r.get("final")]
    transitions = [s for i, s in enumerate(sizes) if i == 0 or s != sizes[i - 1]]
    assert transitions == [2, 3, 2], transitions
    # Each commit's model and optimizer variables are identical on every rank that made it.
    by_step = collections.defaultdict(set)
    for r in rows:
        by_step[(r["size"], r["step"])].add(r["digest"])
    assert all(len(d) == 1 for d in by_step.values()), by_step
    final = [r for r in rows if r.get("final")]
    assert len(final) == 2 and len({r["digest"] for r in final}) == 1, final


@pytest.mark.multiprocess
def test_keras_fit_example_with_gsnr_grows_and_shrinks(tmp_path):
    rows = _grow_and_shrink(tmp_path, "tensorflow2_keras_mnist_elastic.py", "--gsnr", "--pace", "0.3")
    _check_identical(rows)
    # GSNR's step count t never runs ahead of its optimizer's (no extra step at a sync or reset),
    # also on the worker that joined.
    assert all(r["gsnr_step"] == r["step"] for r in rows), [r for r in rows if r["gsnr_step"] != r["step"]]
    assert any(r["rank"] == 2 for r in rows)


@pytest.mark.multiprocess
def test_custom_loop_example_grows_and_shrinks(tmp_path):
    rows = _grow_and_shrink(tmp_path, "tensorflow2_mnist_elastic.py", "--pace", "0.3")
    _check_identical(rows)


def test_state_builds_the_optimizer_without_a_step():
    """A state built before any step holds the optimizer's variables already (no local step needed),
    and a GSNR's t starts at 1 at the first real step."""
    keras = pytest.importorskip("keras")
    pytest.importorskip("horovod.tensorflow")
    import hvd_lb.tf as lb
    from hvd_lb.tf.keras.elastic import KerasState

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    opt = lb.DistributedOptimizer(lb.GSNR(keras.optimizers.Adam(0.1)), micro_batches=2)
    state = KerasState(model, opt, epoch=0)
    assert opt.built and int(opt.iterations.numpy()) == 0
    n, kernel = len(opt.variables), model.layers[0].kernel.numpy()
    model.layers[0].kernel.assign(kernel + 1.0)
    opt.inner_optimizer.gsnr_avg[0].assign(opt.inner_optimizer.gsnr_avg[0] + 1.0)
    state.epoch = 5
    state.restore()
    assert (model.layers[0].kernel.numpy() == kernel).all() and state.epoch == 0
    assert float(abs(opt.inner_optimizer.gsnr_avg[0]).numpy().max()) == 0.0
    state.sync()  # one worker: nothing to broadcast, the snapshot is retaken
    assert len(opt.variables) == n
    # A reset that leaves k = workers × micro_batches < 2 (here: 1 worker, as if M were 1) is refused.
    opt.micro_batches = 1
    with pytest.raises(ValueError, match="k = 1 × 1 = 1"):
        state.reset()


def test_import_paths_and_keras2_lr():
    keras = pytest.importorskip("keras")
    pytest.importorskip("horovod.tensorflow")
    import hvd_lb.tf as lb
    import hvd_lb.tf.keras as lbk
    from hvd_lb.tf import elastic

    assert lb.elastic is elastic and lbk.elastic.run is elastic.run
    assert lbk.elastic.KerasState.__module__ == "hvd_lb.tf.keras.elastic"
    assert elastic.ObjectState.__module__ == "horovod.common.elastic"  # passed through
    opt = lb.GSNR(keras.optimizers.Adam(0.1))
    opt.lr.assign(0.25)  # Keras 2's alias, as Horovod's examples use it
    assert float(opt.inner_optimizer.learning_rate.numpy()) == 0.25
    import tensorflow as tf
    tf.keras.backend.set_value(opt.lr, 0.5)
    assert float(opt.inner_optimizer.learning_rate.numpy()) == 0.5
    with pytest.raises(ValueError, match="invalid model"):
        elastic.TensorFlowKerasState(keras.Sequential([keras.layers.Dense(2)]), opt)
    with pytest.raises(ValueError, match="invalid batches_per_commit=0"):
        lbk.elastic.CommitStateCallback(None, batches_per_commit=0)


def test_first_epoch_after_a_reset_ends_where_the_interrupted_one_would_have():
    """Horovod shortens ``params['steps']`` (ignored by Keras 3); here fit stops that epoch itself."""
    keras = pytest.importorskip("keras")
    import numpy as np
    from hvd_lb.tf.keras.elastic import UpdateBatchStateCallback, UpdateEpochStateCallback

    class State:  # what the callbacks read and write of an elastic state
        batch, epoch = 3, 1

    class Count(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.append(0)

        def on_train_batch_end(self, batch, logs=None):
            seen[-1] += 1

    seen, state = [], State()
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.ones((40, 2), np.float32)
    model.fit(x, x[:, :1], batch_size=4, steps_per_epoch=5, epochs=3 - state.epoch, verbose=0,
              callbacks=[UpdateEpochStateCallback(state), UpdateBatchStateCallback(state), Count()])
    assert seen == [2, 5] and state.epoch == 3 and state.batch == 0


def test_run_restores_the_last_commit_when_an_hvd_lb_collective_fails(monkeypatch):
    """Horovod's run() only knows its ungrouped ops; a failed hvd_lb all-reduce (a grouped op named
    hvd_lb_*) must restore the last commit and retry too, other errors propagate."""
    keras = pytest.importorskip("keras")
    pytest.importorskip("horovod.tensorflow")
    import tensorflow as tf
    from hvd_lb.tf import elastic

    # Horovod's restart (shutdown + init) needs horovodrun's Gloo: MPI cannot init twice.
    monkeypatch.setattr(elastic, "_reset", lambda: None)

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    state = elastic.TensorFlowKerasState(model, keras.optimizers.SGD(0.1), tries=0)
    kernel = model.layers[0].kernel.numpy()

    calls = []

    @elastic.run
    def train(state, error):
        calls.append(error)
        state.tries += 1
        if len(calls) == 1:
            model.layers[0].kernel.assign(kernel + 1.0)
            raise tf.errors.UnknownError(None, None, error)
        return state.tries

    # Retried once, from the last commit: the kernel and the state's attribute restored.
    assert train(state, "Horovod has been shut down.\n\t [[{{node hvd_lb_reduce_3_0a1b2c3d}}]]") == 1
    assert len(calls) == 2 and (model.layers[0].kernel.numpy() == kernel).all()
    calls.clear()
    with pytest.raises(tf.errors.UnknownError, match="not a collective"):
        train(state, "not a collective")
