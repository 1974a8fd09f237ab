"""prewarm_distributed_: two gloo processes on the CPU, each with its own batch (issue 28)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from prewarm_gpu import prewarm_, prewarm_distributed_
from prewarm_gpu.distributed import unwrap

WORKER = Path(__file__).with_name("_dist_worker.py")
K = 8  # the worker's conv has 16 filters: prewarm_ conditions [0, 8)


def run_ranks(scenarios: str, tmp_path: Path, world: int = 2,
              timeout: float = 120.0) -> list[dict]:
    """Run ``scenarios`` (comma-separated) of _dist_worker.py on ``world`` ranks; each rank's
    results, by scenario.

    A FileStore rendezvous (no port to pick); a rank still running after ``timeout`` seconds is
    killed and the test fails, so a hang fails instead of blocking CI.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parent.parent),
                                          os.environ.get("PYTHONPATH", "")])}
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, str(WORKER), scenarios, str(r), str(world),
                               str(store), str(tmp_path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"scenarios {scenarios!r} still running after {timeout} s (a rank hung)")
    for r, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{log}"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every scenario of this file in one two-rank launch: each launch pays the imports, measured
    at about 20 s per launch on the 2-core CPU at load 8, and 25 s for the four together."""
    return run_ranks("ddp,fail,compute,sharded", tmp_path_factory.mktemp("dist"))


def assert_same(a: dict, b: dict, skip=()):
    for key in a:
        if key not in skip:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_broadcast_gives_every_rank_rank0s_filters_before_and_after_ddp(ranks):
    r0, r1 = (r["ddp"] for r in ranks)
    # Before wrapping: rank 0's conditioned filters on both; everything else each rank's own.
    for r in (r0, r1):
        assert (r["plain_report"]["sync"], r["plain_report"]["src"]) == ("broadcast", 0)
        assert r["plain_report"]["n_clusters"] == K
        assert_same(r["plain_before"], r["plain_after"], skip=("0.weight",))
        torch.testing.assert_close(r["plain_after"]["0.weight"][K:],
                                   r["plain_before"]["0.weight"][K:], rtol=0, atol=0)
    torch.testing.assert_close(r0["plain_after"]["0.weight"][:K], r1["plain_after"]["0.weight"][:K],
                               rtol=0, atol=0)
    assert not torch.equal(r0["plain_before"]["2.weight"], r1["plain_before"]["2.weight"])
    assert r0["plain_report"] == r1["plain_report"]  # rank 0's report on both
    # Rank 0's filters are what prewarm_ computes on rank 0's batch alone.
    from _dist_worker import batch, net
    alone = net(100)
    prewarm_(alone, batch(0), generator=0)
    torch.testing.assert_close(r1["plain_after"]["0.weight"][:K], alone[0].weight[:K].detach(),
                               rtol=0, atol=0)

    # After wrapping: DDP made the ranks equal; the call keeps them equal, and training too.
    assert_same(r0["ddp_before"], r1["ddp_before"])
    for r in (r0, r1):
        assert_same(r["ddp_before"], r["ddp_after"], skip=("0.weight",))
        assert r["ddp_report"]["layer"] == "0"  # the inner module's name, not "module.0"
    assert not torch.equal(r0["ddp_after"]["0.weight"], r0["ddp_before"]["0.weight"])
    assert_same(r0["ddp_after"], r1["ddp_after"])
    assert_same(r0["ddp_trained"], r1["ddp_trained"])
    # The bug it fixes: a plain prewarm_ after wrapping leaves the replicas' conv1 apart.
    assert not torch.equal(r0["control_after"]["0.weight"], r1["control_after"]["0.weight"])


def test_a_failure_on_any_rank_raises_on_every_rank_and_writes_nothing(ranks):
    r0, r1 = (r["fail"] for r in ranks)
    assert r0["src_fails"][0] == "ValueError" and "NaN" in r0["src_fails"][1]
    assert r1["src_fails"][0] == "DistributedPrewarmError"
    assert "rank 0" in r1["src_fails"][1] and "NaN" in r1["src_fails"][1]
    assert r1["other_fails"][0] == "ValueError" and "4-D" in r1["other_fails"][1]
    assert r0["other_fails"][0] == "DistributedPrewarmError" and "rank 1" in r0["other_fails"][1]
    for r in (r0, r1):  # rank 0 computed and wrote in the second call: undone
        assert_same(r["before"], r["after_src_fails"])
        assert_same(r["before"], r["after_other_fails"])


def test_compute_mode_checks_that_the_ranks_agree(ranks):
    r0, r1 = (r["compute"] for r in ranks)
    for r in (r0, r1):
        assert r["same"][0] == "ok" and r["same"][1]["sync"] == "compute"
        assert r["same"][1]["src"] is None and r["same"][1]["world_size"] == 2
        assert r["differ"][0] == "DistributedPrewarmError", r["differ"]
        assert "different filters" in r["differ"][1]
        assert_same(r["after_same"], r["after_differ"])  # the failed call undid its write
    torch.testing.assert_close(r0["after_same"]["0.weight"][:K], r1["after_same"]["0.weight"][:K],
                               rtol=0, atol=0)
    assert not torch.equal(r0["after_same"]["0.weight"][K:], r1["after_same"]["0.weight"][K:])


def test_sharded_weights_are_refused_with_how_to(ranks):
    for r in ranks:
        kind, msg = r["sharded"]["sharded"]
        assert kind in ("ValueError", "DistributedPrewarmError"), r
        assert "DTensor" in msg and "before sharding" in msg


# ----------------------------------------------------------------- without torch.distributed
def small(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def test_without_torch_distributed_it_is_prewarm_():
    x = torch.rand(8, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    a, b = small(), small()
    ra = prewarm_(a, x, generator=3)
    rb = prewarm_distributed_(b, x, generator=3)
    assert (rb.sync, rb.src, rb.world_size) == ("local", None, 1)
    assert {k: v for k, v in rb.as_dict().items() if k not in ("sync", "src", "world_size",
                                                                 "seconds")} == \
        {k: v for k, v in ra.as_dict().items() if k != "seconds"}
    assert_same(a.state_dict(), b.state_dict())


def test_plain_prewarm_after_ddp_wrapping_warns(tmp_path):
    """The silent divergence of issue 28: prewarm_ on a DDP-wrapped model writes one rank's
    filters only; it says so (one rank is enough to see the warning)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(small())
        x = torch.rand(8, 3, 12, 12, generator=torch.Generator().manual_seed(0))
        with pytest.warns(UserWarning, match="prewarm_distributed_"):
            prewarm_(ddp, x, generator=0)
        with pytest.warns(UserWarning, match="before wrapping"):
            prewarm_(torch.compile(ddp, backend="eager"), x, generator=0)
    finally:
        dist.destroy_process_group()


def test_unwrap_strips_compile_and_sees_the_same_parameters():
    m = small()
    compiled = torch.compile(m, backend="eager")
    assert unwrap(compiled) is m
    r = prewarm_distributed_(compiled, torch.rand(4, 3, 12, 12), generator=0)
    assert r.layer == "0"


def test_bad_options_name_what_was_wrong():
    x = torch.rand(4, 3, 12, 12)
    with pytest.raises(ValueError, match="sync must be one of"):
        prewarm_distributed_(small(), x, sync="gather")
    with pytest.raises(ValueError, match="not initialised"):
        prewarm_distributed_(small(), x, process_group=object())
    with pytest.raises(TypeError, match="unexpected keyword"):
        prewarm_distributed_(small(), x, n_cluster=3)
