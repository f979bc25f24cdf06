"""``import hvd_lb.torch as hvd`` in a script written the way Horovod's examples teach."""
import json

import pytest

from tests.hvdrun import ROOT, run_horovod

SCRIPT = ROOT / "tests" / "scripts" / "horovod_style_torch.py"


def test_module_gives_what_horovod_torch_gives():
    hvd_torch = pytest.importorskip("horovod.torch")
    import hvd_lb.torch as hvd

    public = [n for n in dir(hvd_torch) if not n.startswith("_")]
    missing = [n for n in public if not hasattr(hvd, n)]
    assert not missing
    assert set(public) <= set(dir(hvd))
    for name in ("init", "allreduce_async_", "Adasum", "join", "ProcessSet", "Compression"):
        assert getattr(hvd, name) is getattr(hvd_torch, name)
    # hvd_lb's own, supersets of Horovod's (same arguments)
    assert hvd.DistributedOptimizer is not hvd_torch.DistributedOptimizer
    assert hvd.broadcast_optimizer_state is not hvd_torch.broadcast_optimizer_state
    assert hvd.elastic.TorchState is not hvd_torch.elastic.TorchState
    assert hvd.elastic.run is hvd_torch.elastic.run and hvd.elastic.ElasticSampler is hvd_torch.elastic.ElasticSampler
    assert hvd.GSNR is not None and hvd.VRLAMB.__name__ == "VRLAMB"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for key, flags in (("horovod", ["--hvd", "horovod"]), ("hvd_lb", ["--hvd", "hvd_lb"]),
                       ("gsnr", ["--hvd", "hvd_lb", "--gsnr"])):
        path = tmp_path_factory.mktemp(key) / "out.json"
        run_horovod([SCRIPT, *flags, "--out", path], np=2, timeout=300)
        out[key] = json.loads(path.read_text())
    return out


@pytest.mark.multiprocess
def test_without_gsnr_bit_identical_to_horovod(runs):
    """Same script, only the import changed: the same parameters after 20 steps, bit for bit."""
    assert runs["horovod"]["digest"] is not None
    assert runs["hvd_lb"]["digest"] == runs["horovod"]["digest"]
    assert runs["hvd_lb"]["accuracy"] == runs["horovod"]["accuracy"]
    assert runs["hvd_lb"]["optimizer"] == runs["horovod"]["optimizer"] == "SGD"


@pytest.mark.multiprocess
def test_one_more_line_turns_gsnr_on_and_trains(runs):
    gsnr = runs["gsnr"]
    assert gsnr["optimizer"] == "DistributedGSNR"
    assert gsnr["digest"] != runs["horovod"]["digest"]
    assert gsnr["losses"][-1] < gsnr["losses"][0]
    # Two epochs on 8192 images, k = 2 workers × 2 passes: both well above chance (10 %).
    assert gsnr["accuracy"] > 0.6 and runs["horovod"]["accuracy"] > 0.6
