"""A PyTorch training script written the way Horovod's examples teach (pytorch_mnist.py,
pytorch_imagenet_resnet50.py): hvd.init, DistributedSampler, lr scaled by size,
broadcast_parameters + broadcast_optimizer_state, compression, op, gradient_predivide_factor,
backward_passes_per_step, gradient clipping between synchronize() and step(), and a
metric average through hvd.allreduce.

``--hvd horovod`` imports horovod.torch, ``--hvd hvd_lb`` imports hvd_lb.torch as hvd (the one
changed line); ``--gsnr`` adds the one line that turns GSNR on. Rank 0 writes ``--out`` (JSON):
test accuracy, per-epoch loss and a digest of the parameters after ``--digest-step`` steps.
"""
import argparse
import hashlib
import json

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

parser = argparse.ArgumentParser()
parser.add_argument("--hvd", choices=["horovod", "hvd_lb"], default="horovod")
parser.add_argument("--gsnr", action="store_true")
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--lr", type=float, default=0.01)
parser.add_argument("--momentum", type=float, default=0.5)
parser.add_argument("--batches-per-allreduce", type=int, default=2)
parser.add_argument("--clip", type=float, default=5.0)
parser.add_argument("--fp16-allreduce", action="store_true")
parser.add_argument("--use-adasum", action="store_true")
parser.add_argument("--gradient-predivide-factor", type=float, default=1.0)
parser.add_argument("--train-subset", type=int, default=8192)
parser.add_argument("--digest-step", type=int, default=20, help="digest the parameters after this step")
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--out", default="")
args = parser.parse_args()

if args.hvd == "hvd_lb":
    import hvd_lb.torch as hvd
else:
    import horovod.torch as hvd

hvd.init()
torch.manual_seed(args.seed)
torch.set_num_threads(1)


def fashion_mnist(split, limit=None):
    from hvd_lb.launch.data import load_fashion_mnist

    x, y = load_fashion_mnist(split)
    x = (torch.tensor(x[:limit]).unsqueeze(1) - 0.2860) / 0.3530
    return torch.utils.data.TensorDataset(x, torch.tensor(y[:limit]))


train_dataset = fashion_mnist("train", args.train_subset)
test_dataset = fashion_mnist("test", 2000)
train_sampler = torch.utils.data.distributed.DistributedSampler(train_dataset, num_replicas=hvd.size(),
                                                                rank=hvd.rank())
train_loader = torch.utils.data.DataLoader(train_dataset, batch_size=args.batch_size, sampler=train_sampler)
test_sampler = torch.utils.data.distributed.DistributedSampler(test_dataset, num_replicas=hvd.size(),
                                                               rank=hvd.rank())
test_loader = torch.utils.data.DataLoader(test_dataset, batch_size=1000, sampler=test_sampler)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=5)
        self.fc1 = nn.Linear(8 * 12 * 12, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(self.fc1(x.flatten(1)))
        return F.log_softmax(self.fc2(x), dim=1)


model = Net()
# Horovod: scale learning rate by lr_scaler (Adasum does not need it).
lr_scaler = args.batches_per_allreduce * hvd.size() if not args.use_adasum else 1
optimizer = optim.SGD(model.parameters(), lr=args.lr * lr_scaler, momentum=args.momentum)
if args.gsnr:
    optimizer = hvd.GSNR(optimizer)
# Horovod: broadcast parameters & optimizer state.
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
hvd.broadcast_optimizer_state(optimizer, root_rank=0)
# Horovod: (optional) compression algorithm.
compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none
# Horovod: wrap optimizer with DistributedOptimizer.
optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                     compression=compression,
                                     backward_passes_per_step=args.batches_per_allreduce,
                                     op=hvd.Adasum if args.use_adasum else hvd.Average,
                                     gradient_predivide_factor=args.gradient_predivide_factor)


def metric_average(val, name):
    return hvd.allreduce(torch.tensor(val), name=name).item()


steps = 0
losses = []
digest = None
for epoch in range(1, args.epochs + 1):
    model.train()
    train_sampler.set_epoch(epoch)
    batches = list(train_loader)
    total = 0.0
    for i in range(0, len(batches) - args.batches_per_allreduce + 1, args.batches_per_allreduce):
        optimizer.zero_grad()
        for data, target in batches[i:i + args.batches_per_allreduce]:
            loss = F.nll_loss(model(data), target) / args.batches_per_allreduce
            loss.backward()
            total += loss.item()
        # Horovod: gradient clipping needs the reduced gradients first.
        optimizer.synchronize()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        with optimizer.skip_synchronize():
            optimizer.step()
        steps += 1
        if steps == args.digest_step:
            digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    losses.append(metric_average(total / max(1, len(batches) // args.batches_per_allreduce), "avg_loss"))

model.eval()
correct = 0
with torch.no_grad():
    for data, target in test_loader:
        correct += model(data).argmax(1).eq(target).sum().item()
accuracy = metric_average(correct / len(test_sampler), "avg_accuracy")
if hvd.rank() == 0 and args.out:
    with open(args.out, "w") as f:
        json.dump({"accuracy": accuracy, "losses": losses, "steps": steps, "digest": digest,
                   "optimizer": type(optimizer).__name__}, f)
