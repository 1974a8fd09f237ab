"""One rank of tests/test_distributed.py and tests/test_hooks.py: ``python _dist_worker.py
SCENARIO[,SCENARIO...] RANK WORLD STORE OUT``: the scenarios one after another in one process
group (a launch costs seconds of imports on a busy CPU). Gloo on the CPU through a FileStore (no
TCP store), its pair sockets on the loopback; each rank saves what it saw to OUT/rank{RANK}.pt.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from prewarm_gpu import prewarm_
from prewarm_gpu.distributed import prewarm_distributed_


def net(seed: int) -> nn.Module:
    """A small CNN whose every parameter depends on ``seed`` (a different one per rank)."""
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def batch(seed: int, n: int = 8) -> torch.Tensor:
    return torch.rand(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def outcome(fn):
    """('ok', report dict) or (exception type name, message)."""
    try:
        return "ok", fn().as_dict()
    except Exception as e:
        return type(e).__name__, str(e)


def scenario_ddp(rank):
    out = {}
    x = batch(rank)  # each rank its own batch
    plain = net(100 + rank)  # before wrapping: every parameter differs between the ranks
    out["plain_before"] = state(plain)
    out["plain_report"] = prewarm_distributed_(plain, x, generator=0).as_dict()
    out["plain_after"] = state(plain)

    wrapped = DDP(net(100 + rank))  # DDP broadcasts rank 0's parameters here, and only here
    out["ddp_before"] = state(wrapped.module)
    out["ddp_report"] = prewarm_distributed_(wrapped, x, generator=0).as_dict()
    out["ddp_after"] = state(wrapped.module)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    wrapped(x).sum().backward()
    opt.step()
    out["ddp_trained"] = state(wrapped.module)

    control = DDP(net(100 + rank))  # the bug: a plain prewarm_ after wrapping
    prewarm_(control.module, x, generator=0)
    out["control_after"] = state(control.module)
    return out


def scenario_fail(rank):
    out = {}
    m = net(100 + rank)
    out["before"] = state(m)
    x = batch(rank)
    if rank == 0:
        x[0, 0, 0, 0] = float("nan")
    out["src_fails"] = outcome(lambda: prewarm_distributed_(m, x, generator=0))
    out["after_src_fails"] = state(m)
    # A failure on a rank that does not compute: src has already written, and must undo it.
    y = batch(rank) if rank == 0 else batch(rank)[0]
    out["other_fails"] = outcome(lambda: prewarm_distributed_(m, y, generator=0))
    out["after_other_fails"] = state(m)
    return out


def scenario_compute(rank):
    out = {}
    m = net(100 + rank)
    out["same"] = outcome(lambda: prewarm_distributed_(m, batch(0), sync="compute", generator=0))
    out["after_same"] = state(m)
    out["differ"] = outcome(lambda: prewarm_distributed_(m, batch(rank), sync="compute",
                                                         generator=0))
    out["after_differ"] = state(m)
    return out


def scenario_sharded(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    m = net(100)
    fully_shard(m, mesh=init_device_mesh("cpu", (2,)))
    return {"sharded": outcome(lambda: prewarm_distributed_(m, batch(rank), generator=0))}


def scenario_hook(rank):
    """The first-batch hook in a plain DDP loop, each rank with its own data."""
    from prewarm_gpu.hooks import prewarm_on_first_batch

    out = {}
    model = DDP(net(100 + rank))
    handle = prewarm_on_first_batch(model, generator=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    initial = state(model.module)
    seen = []
    for step in range(3):
        x = batch(10 * step + rank)
        loss = model(x).square().mean()
        if step == 0:
            seen.append(state(model.module))  # after the hook's forward, before the step
        opt.zero_grad()
        loss.backward()
        opt.step()
    out["initial"] = initial
    out["after_first"] = seen[0]
    out["final"] = state(model.module)
    out["report"] = handle.report.as_dict()
    out["hooks_left"] = len(model.module._forward_pre_hooks)
    return out


def main():
    name, rank, world, store, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:]
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        result = {n: globals()[f"scenario_{n}"](rank) for n in name.split(",")}
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
