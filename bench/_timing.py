"""Interleaved timing shared by the bench scripts (torch and TF): every round runs each variant
once after a barrier, so load on the machine hits all variants alike."""
import statistics
import time


def time_rounds(runs, barrier, warmup, iters):
    """``runs``: name → callable. Returns (medians, first-call wall seconds per name).

    ``medians`` has each name's wall-clock median and ``name@cpu``, the median CPU time of
    this process (``time.process_time``), which other processes' load does not disturb.
    """
    times, cpu, first = {k: [] for k in runs}, {k: [] for k in runs}, {}
    for it in range(warmup + iters):
        for k, run in runs.items():
            barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if it == 0:
                first[k] = dt
            if it >= warmup:
                times[k].append(dt)
                cpu[k].append(dc)
    med = {k: statistics.median(v) for k, v in times.items()}
    med.update({k + "@cpu": statistics.median(v) for k, v in cpu.items()})
    return med, first


def horovod_torch_rounds(runs, grads, warmup, iters):
    """``time_rounds`` of ``runs`` plus "allreduce" (one Horovod all-reduce of every tensor in
    ``grads``, the yardstick of "VR extra"), a Horovod barrier before each run."""
    import torch
    import horovod.torch as hvd

    def allreduce():
        handles = [hvd.allreduce_async_(g, name=f"bench.ar.{i}", op=hvd.Average) for i, g in enumerate(grads)]
        for h in handles:
            hvd.synchronize(h)

    return time_rounds({**runs, "allreduce": allreduce},
                       lambda: hvd.allreduce(torch.zeros(1), name="bench.barrier"), warmup, iters)
