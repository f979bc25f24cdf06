"""The LR helpers of ``hvd_lb.schedules`` as ``torch.optim.lr_scheduler`` objects (SPEC §5)."""
from __future__ import annotations

import torch

from .. import schedules
from ..schedules import scaled_lr, tvlars_delay_steps  # noqa: F401  (re-exported)


class WarmupDecayLR(torch.optim.lr_scheduler.LRScheduler):
    """Linear warm-up to each group's lr, then cosine / polynomial / constant decay to ``final_lr``.

    lr(step) = schedules.warmup_decay(step, base_lr, ...) with the zero-based step
    index (construction applies step 0; each ``scheduler.step()`` advances one),
    so it equals the Keras schedule of the TF backend value for value.
    """

    def __init__(self, optimizer, warmup_steps: int, total_steps: int, final_lr: float = 0.0,
                 decay: str = "cosine", power: float = 1.0, last_epoch: int = -1):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"invalid optimizer={optimizer!r}: must be a torch.optim.Optimizer")
        for group in optimizer.param_groups:
            base = group.get("initial_lr", group["lr"]) if last_epoch != -1 else group["lr"]
            schedules.check_schedule(base, warmup_steps, total_steps, final_lr, decay, power)
        self.warmup_steps, self.total_steps = int(warmup_steps), int(total_steps)
        self.final_lr, self.decay, self.power = float(final_lr), decay, float(power)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        return [schedules.warmup_decay(self.last_epoch, base, self.warmup_steps, self.total_steps,
                                       self.final_lr, self.decay, self.power) for base in self.base_lrs]
