"""Horovod PyTorch training, before and after hvd_lb.

torch_horovod.py is plain Horovod, written the way Horovod's docs teach;
torch_hvd_lb.py is the same script on hvd_lb with GSNR (VR-Momentum): two lines differ,
the import and the line that puts the GSNR transform in front of the optimizer.
Run either with:  horovodrun -np 2 -H localhost:2 python examples/<file> --steps 20
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
import horovod.torch as hvd

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--batch-size", type=int, default=256, help="per worker")
parser.add_argument("--lr", type=float, default=0.05)
args = parser.parse_args()

hvd.init()
torch.manual_seed(0)
torch.set_num_threads(1)

# Synthetic 10-class data: each worker draws its own shard.
centers = torch.randn(10, 64, generator=torch.Generator().manual_seed(0)) * 2
gen = torch.Generator().manual_seed(1 + hvd.rank())


def batch():
    y = torch.randint(0, 10, (args.batch_size,), generator=gen)
    return centers[y] + torch.randn(args.batch_size, 64, generator=gen), y


model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.LayerNorm(128), nn.Linear(128, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * hvd.size(), momentum=0.9)
optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
hvd.broadcast_optimizer_state(optimizer, root_rank=0)

for step in range(args.steps):
    x, y = batch()
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    if hvd.rank() == 0 and (step % 10 == 0 or step == args.steps - 1):
        print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
