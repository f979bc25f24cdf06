"""Demo worker (PyTorch): runs every (optimizer, lr, seed) of the config under Horovod.

Started by ``hvd-lb demo`` through horovodrun; rank 0 prints progress and
writes the raw per-run results for the driver.
"""
from __future__ import annotations

import json
import sys

from . import demo_common as common


def make_model(torch):
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, stride=2, padding=2), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(512, 10),
    )


def count_correct(model, x, y, chunk=2500) -> int:
    return sum((model(x[a:a + chunk]).argmax(1) == y[a:a + chunk]).sum().item() for a in range(0, len(x), chunk))


def main(cfg_path: str) -> None:
    import horovod.torch as hvd
    import torch
    import torch.nn.functional as F

    import hvd_lb.torch as lb
    from hvd_lb import rules
    from hvd_lb.data import load_fashion_mnist

    with open(cfg_path) as f:
        cfg = json.load(f)
    hvd.init()
    torch.set_num_threads(1)
    rank, size = hvd.rank(), hvd.size()
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    if cfg["train_subset"]:
        x_train, y_train = x_train[:cfg["train_subset"]], y_train[:cfg["train_subset"]]
    x_train = torch.from_numpy(x_train).unsqueeze(1)
    y_train = torch.from_numpy(y_train)
    # Each rank scores its share of the test set (and of a fixed 10k training
    # subset, for the train-test gap); one all-reduce sums the counts.
    x_test = torch.from_numpy(x_test[rank::size]).unsqueeze(1)
    y_test = torch.from_numpy(y_test[rank::size])
    x_eval, y_eval = x_train[:10000][rank::size], y_train[:10000][rank::size]
    batch, micro = cfg["batch_size"], cfg["micro_batches"]
    local = batch // size
    micro_size = local // micro
    steps_per_epoch = len(x_train) // batch
    total_steps = steps_per_epoch * cfg["epochs"]
    results = []
    for i, run in enumerate(cfg["runs"]):
        torch.manual_seed(run["seed"])
        model = make_model(torch)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        opt = lb.create(run["optimizer"], model, lr=run["lr"], weight_decay=cfg["weight_decay"])
        opt = lb.DistributedOptimizer(opt, named_parameters=model.named_parameters(), micro_batches=micro)
        # TVLARS replaces warm-up (its paper); every other rule warms up for one epoch.
        warmup = 0 if run["optimizer"].endswith("tvlars") else min(steps_per_epoch, total_steps)
        sched = lb.WarmupDecayLR(opt, warmup_steps=warmup, total_steps=total_steps, decay="cosine")
        is_vr = rules.get_rule(run["optimizer"]).gsnr
        gen = torch.Generator().manual_seed(1000 + run["seed"])
        rec = common.new_record(run)
        for epoch in range(cfg["epochs"]):
            perm = torch.randperm(len(x_train), generator=gen)
            loss_sum = 0.0
            model.train()
            for step in range(steps_per_epoch):
                idx = perm[step * batch + rank * local: step * batch + (rank + 1) * local]
                for m in range(micro):
                    j = idx[m * micro_size:(m + 1) * micro_size]
                    out = model(x_train[j])
                    loss = F.cross_entropy(out, y_train[j])
                    # Divide by M: Horovod sums micro-batch gradients (backward_passes_per_step).
                    (loss / micro).backward()
                    loss_sum += loss.item() / micro
                opt.step()
                opt.zero_grad()
                sched.step()
                if is_vr:
                    common.add_gsnr(rec, opt.gsnr_diagnostics())
            train_loss = hvd.allreduce(torch.tensor(loss_sum / steps_per_epoch, dtype=torch.float64),
                                       op=hvd.Average, name="train_loss").item()
            model.eval()
            with torch.no_grad():
                counts = [count_correct(model, x_test, y_test), len(x_test),
                          count_correct(model, x_eval, y_eval), len(x_eval)]
            tot = hvd.allreduce(torch.tensor(counts, dtype=torch.float64), op=hvd.Sum, name="eval")
            if not common.end_epoch(rec, cfg, i, epoch, train_loss, tot.tolist(), rank):
                break
        results.append(common.end_run(rec))
    common.write_results(cfg, results, rank)


if __name__ == "__main__":
    main(sys.argv[1])
