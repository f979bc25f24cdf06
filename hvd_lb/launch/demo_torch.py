"""Demo worker (PyTorch): runs every run of the config, one after the other, under Horovod.

Started by ``hvd-lb demo`` through horovodrun. Each step's global batch is
split over the ranks, each rank's share into M micro-batches whose losses are
divided by M (Horovod sums micro-batch gradients, as ``backward_passes_per_step``),
so k = ranks × M gradient samples reach the optimizer. Test accuracy on the
10k test set and train accuracy on a fixed 10k training subset are scored
after every epoch, each rank its shard, one all-reduce summing the counts.
Rank 0 reports progress to the driver and writes the raw records.
"""
from __future__ import annotations

import json
import sys

from . import demo_common as common


def make_model(torch, arch: str, seed: int):
    """The demo model (``demo_common``): the MLP from torch's default init under ``seed``;
    the CNN from ``common.cnn_weights(seed)``, the numbers the TF worker starts from too."""
    from collections import OrderedDict

    nn = torch.nn
    torch.manual_seed(seed)
    if arch == "mlp":
        h1, h2 = common.HIDDEN
        return nn.Sequential(nn.Linear(784, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 10))
    layers, c_in = OrderedDict(), 1
    for i, c in enumerate(common.CNN_CHANNELS, 1):
        layers[f"conv{i}"] = nn.Conv2d(c_in, c, 3, stride=2 if i < 3 else 1, padding=1, bias=False)
        layers[f"bn{i}"] = nn.BatchNorm2d(c, eps=common.BN_EPS, momentum=common.BN_MOMENTUM)
        layers[f"relu{i}"] = nn.ReLU()
        c_in = c
    layers.update(gap=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(c_in, 10))
    model = nn.Sequential(layers)
    with torch.no_grad():
        for name, w in common.cnn_weights(seed).items():
            model.get_parameter(name).copy_(torch.from_numpy(w))
    return model


def average_buffers(hvd, torch, model) -> None:
    """Batch norm's running statistics differ per rank (each saw its own shard): use their
    mean for evaluation, so every rank scores the same model."""
    for name, b in model.named_buffers():
        if b.is_floating_point():
            b.copy_(hvd.allreduce(b, op=hvd.Average, name=f"buffer.{name}"))


def count_correct(model, x, y, chunk=5000) -> int:
    return sum((model(x[a:a + chunk]).argmax(1) == y[a:a + chunk]).sum().item() for a in range(0, len(x), chunk))


def main(cfg_path: str) -> None:
    import horovod.torch as hvd
    import numpy as np
    import torch
    import torch.nn.functional as F

    import hvd_lb.torch as lb
    from hvd_lb import rules
    from hvd_lb.launch.data import load_fashion_mnist

    with open(cfg_path) as f:
        cfg = json.load(f)
    hvd.init()
    torch.set_num_threads(1)
    rank, size = hvd.rank(), hvd.size()
    progress = common.Progress(cfg, rank)
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    if cfg["train_subset"]:
        x_train, y_train = x_train[:cfg["train_subset"]], y_train[:cfg["train_subset"]]
    x_train, x_test = common.standardize(x_train, x_test)
    arch = cfg.get("arch", "mlp")
    if arch == "cnn":  # NCHW images
        x_train, x_test = x_train.reshape(-1, 1, 28, 28), x_test.reshape(-1, 1, 28, 28)
    x_train, y_train = torch.from_numpy(x_train), torch.from_numpy(y_train)
    x_test, y_test = torch.from_numpy(x_test[rank::size]), torch.from_numpy(y_test[rank::size])
    x_eval, y_eval = x_train[:10000][rank::size], y_train[:10000][rank::size]
    results = []
    for i, run in enumerate(cfg["runs"]):
        plan = common.run_plan(run, cfg, len(x_train), size)
        local, micro, micro_size = plan["local"], plan["micro"], plan["micro_size"]
        batch = run["batch_size"]
        model = make_model(torch, arch, run["seed"])
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        opt = lb.create(run["optimizer"], model, lr=run["lr"], weight_decay=cfg["weight_decay"])
        opt = lb.DistributedOptimizer(opt, named_parameters=model.named_parameters(), micro_batches=micro,
                                      **({"square_dtype": cfg.get("square_dtype"),
                                          "gsnr_interval": cfg.get("gsnr_interval", 1)}
                                         if rules.get_rule(run["optimizer"]).gsnr else {}))
        sched = lb.WarmupDecayLR(opt, warmup_steps=plan["warmup_steps"], total_steps=plan["total_steps"],
                                 decay="cosine")
        is_vr = rules.get_rule(run["optimizer"]).gsnr
        gen = torch.Generator().manual_seed(1000 + run["seed"])
        rng = np.random.default_rng(1000 + run["seed"])  # the CNN's order, the TF worker's too
        rec = common.new_record(run, plan)
        for epoch in range(cfg["epochs"]):
            perm = (torch.randperm(len(x_train), generator=gen) if arch == "mlp"
                    else torch.from_numpy(rng.permutation(len(x_train))))
            loss_sum = 0.0
            model.train()
            for step in range(plan["steps_per_epoch"]):
                idx = perm[step * batch + rank * local: step * batch + (rank + 1) * local]
                for m in range(micro):
                    j = idx[m * micro_size:(m + 1) * micro_size]
                    loss = F.cross_entropy(model(x_train[j]), y_train[j])
                    (loss / micro).backward()
                    loss_sum += loss.item() / micro
                opt.step()
                opt.zero_grad()
                sched.step()
                if is_vr:
                    common.add_gsnr(rec, opt.gsnr_diagnostics())
            train_loss = hvd.allreduce(torch.tensor(loss_sum / plan["steps_per_epoch"], dtype=torch.float64),
                                       op=hvd.Average, name="train_loss").item()
            model.eval()
            average_buffers(hvd, torch, model)
            with torch.no_grad():
                counts = [count_correct(model, x_test, y_test), len(x_test),
                          count_correct(model, x_eval, y_eval), len(x_eval)]
            tot = hvd.allreduce(torch.tensor(counts, dtype=torch.float64), op=hvd.Sum, name="eval")
            if not common.end_epoch(rec, i, epoch, train_loss, tot.tolist(), progress):
                break
        results.append(common.end_run(rec, i, progress))
        common.write_results(cfg, results, rank)


if __name__ == "__main__":
    main(sys.argv[1])
