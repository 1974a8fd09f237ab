"""The ``smoke`` part: every CUDA path of the project once, each case pass/fail with its error."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpu_suite_parts.core import ROOT, Ctx, _finite_params, _sync
from gpu_suite_parts.measure import _blobs
from prewarm_gpu import MiniBatchKMeans, prewarm_


def _tiny_data(name: str, dev: torch.device, n_train: int = 256, n_test: int = 128):
    import bench_training

    return bench_training.synthetic(name, n_train, n_test, str(dev))


def _simplecnn(data, seed: int, arch: str = "simplecnn") -> nn.Module:
    """A model whose weights come from ``seed`` alone: built under a forked CPU RNG (the
    constructor's default draw leaks nothing, and no CUDA generator is touched), then redrawn
    He-normal from a CPU generator."""
    from prewarm_gpu.models import build_model, reinit_

    s = data.spec
    with torch.random.fork_rng(devices=[]):
        m = build_model(arch, in_channels=s.in_channels, n_classes=s.n_classes,
                        image_size=s.image_size)
    reinit_(m, "he-normal", generator=torch.Generator().manual_seed(seed))
    return m.to(data.device)


def _batch(data, n: int = 128) -> dict[str, torch.Tensor]:
    x = data.train_x[:n]
    return {"images": data.standardise(x), "raw": data.raw(x)}


def _smoke_prewarm(data) -> dict:
    model = _simplecnn(data, 0)
    before = model.conv1.weight.detach().clone()
    b = _batch(data)
    r = prewarm_(model, b["images"], raw_images=b["raw"], generator=0)
    _sync(data.device)
    _finite_params(model)
    if torch.equal(before, model.conv1.weight):
        raise AssertionError("prewarm_ left conv1 unchanged")
    return {"n_clusters": r.n_clusters, "n_patches": r.n_patches, "rule": r.rule,
            "scale": r.scale, "kmeans_steps": r.kmeans_steps}


def _smoke_kmeans(dev: torch.device, loop: str, fits: dict) -> dict:
    X, _ = _blobs(4096, 27, 16)
    km = MiniBatchKMeans(16, loop=loop, random_state=0).fit(X.to(dev))
    if km.cluster_centers_.device.type != dev.type or not math.isfinite(km.inertia_):
        raise AssertionError(f"centres on {km.cluster_centers_.device}, inertia {km.inertia_}")
    fits[loop] = km
    return {"inertia": km.inertia_, "n_steps": km.n_steps_, "n_iter": km.n_iter_}


def _smoke_loops_agree(fits: dict) -> dict:
    """The device and host loops run the same steps to the same result (their docstring)."""
    if set(fits) != {"device", "host"}:
        raise RuntimeError(f"only the {sorted(fits)} loop(s) passed")
    d, h = fits["device"], fits["host"]
    diff = float((d.cluster_centers_ - h.cluster_centers_).abs().max())
    if d.n_steps_ != h.n_steps_ or diff > 1e-4:
        raise AssertionError(f"device loop {d.n_steps_} steps, host loop {h.n_steps_}; "
                             f"max |Δcentre| {diff:.3g} (expected the same steps, ≤ 1e-4)")
    return {"n_steps": d.n_steps_, "max_abs_centre_diff": diff}


def _smoke_train(data, backend: str, precision: str, steps: int = 3,
                 compile: bool = False) -> dict:
    from prewarm_gpu.train import TrainConfig, choose_backend, train_batched

    models = [_simplecnn(data, s) for s in (0, 1)]
    cfg = TrainConfig(steps=steps, batch_size=32, lr_start=data.spec.lr_start,
                      lr_end=data.spec.lr_end, eval_points=1, loss_points=2)
    res = train_batched(models, data, cfg, seeds=[0, 1], precision=precision, backend=backend,
                        compile=compile)
    bad = [(r.status, r.error) for r in res if r.status != "ok" or not all(map(math.isfinite,
                                                                               r.loss))]
    if bad:
        raise AssertionError(f"runs failed or lost non-finite: {bad}")
    for m in models:
        _finite_params(m)
    out = {"loss": [r.loss[-1] for r in res], "accuracy": [r.accuracy for r in res]}
    if backend == "auto":
        out["chosen"] = choose_backend("auto", models, data.device)
    return out


_KILL_AT = """
import sys
from prewarm_gpu import cli
from prewarm_gpu.experiment import engine

class Bar:  # interrupts the sweep (as Ctrl-C would) once `at` run-steps are reported
    n = 0
    def update(self, n):
        self.n += n
        if self.n >= int(sys.argv[1]):
            raise KeyboardInterrupt
    def set_postfix_str(self, *a, **k): pass
    def close(self): pass

engine._progress_bar = lambda total, enabled: Bar()
sys.exit(cli.main(sys.argv[2:]))
"""


def _reproduce(argv: list[str], cwd: Path, timeout: float, kill_at: int | None = None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "prewarm_gpu", *argv] if kill_at is None else \
        [sys.executable, "-c", _KILL_AT, str(kill_at), *argv]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=max(timeout, 1.0))


def _smoke_cli(ctx: Ctx, steps: int = 20, every: int = 10, cut_at: int = 15) -> dict:
    """``prewarm-gpu reproduce`` on digits: interrupted after the step-``every`` checkpoint
    (a deterministic stop: a timed kill misses a 20-step run on a GPU), then ``--resume`` from
    it; without ``--quick`` also an uninterrupted run, to compare the records."""
    seeds = ["42"]
    runs = 2 * len(seeds)  # the two arms
    common = ["reproduce", "--dataset", "digits", "--steps", str(steps), "--seeds", *seeds,
              "--eval-points", "2", "--checkpoint-every", str(every), "--device", str(ctx.dev)]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-suite-cli-") as tmp:
        tmp = Path(tmp)
        cut = _reproduce([*common, "--out", str(tmp / "cut")], tmp, ctx.left(), runs * cut_at)
        out["interrupted_exit"] = cut.returncode
        if cut.returncode != 130 or "checkpointed" not in cut.stderr:
            raise AssertionError(f"the interrupted run exited {cut.returncode} without a "
                                 f"checkpoint message: {cut.stderr[-1500:]}")
        out["checkpoint_message"] = next(
            (ln.strip() for ln in cut.stderr.splitlines() if "checkpointed" in ln), "")[:300]
        res = _reproduce([*common, "--out", str(tmp / "cut"), "--resume", "--no-progress"], tmp,
                         ctx.left())
        out["resume_exit"] = res.returncode
        if res.returncode != 0:
            raise AssertionError(f"--resume exited {res.returncode}: {res.stderr[-1500:]}")
        recs = [json.loads(ln) for ln in (tmp / "cut" / "results.jsonl").read_text().splitlines()]
        if len(recs) != runs or any(r["status"] != "ok" for r in recs):
            raise AssertionError(f"after --resume: {len(recs)} records of {runs}, statuses "
                                 f"{[r['status'] for r in recs]}")
        out["accuracy"] = {r["key"]: r["accuracy"] for r in recs}
        if not ctx.quick:
            ref = _reproduce([*common, "--out", str(tmp / "ref"), "--no-progress"], tmp,
                             ctx.left())
            if ref.returncode != 0:
                raise AssertionError(f"the uninterrupted run exited {ref.returncode}: "
                                     f"{ref.stderr[-1500:]}")
            refs = [json.loads(ln)
                    for ln in (tmp / "ref" / "results.jsonl").read_text().splitlines()]
            # Bit-identical is promised on the CPU only (cuDNN may pick non-deterministic
            # algorithms): recorded, not asserted.
            out["resumed_equals_uninterrupted"] = \
                {r["key"]: r["accuracy"] for r in refs} == out["accuracy"]
    return out


def _smoke_method(data, name: str) -> dict:
    from prewarm_gpu import registry
    from prewarm_gpu.experiment.arms import init_with_generator

    fn = registry.get(name)
    model = _simplecnn(data, 0, getattr(fn, "requires_model", None) or "simplecnn")
    # datadep's own k-means and rescaling rounds at their smallest: the CUDA path is the same.
    options: dict[str, Any] = {"max_samples": 2000, "max_rounds": 2} if name == "datadep" else {}
    if name == "filterbank":
        from prewarm_gpu.methods.filterbank import build_bank

        sources = [_simplecnn(data, s).cpu().state_dict() for s in (1, 2)]
        options["bank"] = build_bank(sources, generator=0)
    # The harness's own call: refuses an initialiser that draws from a global (CPU or CUDA) RNG.
    report = init_with_generator(fn, model, _batch(data, 64), 0, options, data.device)
    _sync(data.device)
    _finite_params(model)
    return {"report_keys": sorted(report)[:12]}


def part_smoke(ctx: Ctx) -> None:
    dev, cuda = ctx.dev, ctx.dev.type == "cuda"
    g = 1.0 if cuda else 2.0  # first guesses; later cases of a kind use the last one measured
    grey, colour = _tiny_data("mnist", dev), _tiny_data("cifar10", dev)
    small = _tiny_data("digits", dev)  # 8×8: the same CUDA paths as 28×28, at a fraction of it
    ctx.case("prewarm_ grey (auto rules)", lambda: _smoke_prewarm(grey), kind="prewarm",
             guess=3 * g)
    ctx.case("prewarm_ colour (auto rules)", lambda: _smoke_prewarm(colour), kind="prewarm",
             guess=3 * g)
    fits: dict[str, MiniBatchKMeans] = {}
    for loop in ("device", "host"):
        ctx.case(f"kmeans loop={loop}", lambda loop=loop: _smoke_kmeans(dev, loop, fits),
                 kind="kmeans", guess=g)
    ctx.case("kmeans loops agree", lambda: _smoke_loops_agree(fits), guess=0.1)
    from prewarm_gpu.train import BACKENDS, PRECISIONS

    for backend in (*(b for b in BACKENDS if b != "auto"), "auto"):  # every backend, auto last
        for precision in PRECISIONS if backend != "auto" else ("fp32",):
            ctx.case(f"train {backend} {precision}",
                     lambda b=backend, p=precision: _smoke_train(small, b, p), kind="train",
                     guess=5 * g)
    if cuda:  # --compile's path once (inductor; on the CPU it is traced by the tests instead)
        ctx.case("train grouped fp32 --compile", lambda: _smoke_train(small, "grouped", "fp32",
                                                                     compile=True),
                 kind="compile", guess=60)
    ctx.case("cli reproduce + checkpoint + resume", lambda: _smoke_cli(ctx),
             guess=45 if cuda or not ctx.quick else 25)
    for name in ("lsuv", "datadep", "gabor", "filterbank", "lion_dg"):
        ctx.case(f"method {name}", lambda n=name: _smoke_method(small, n), kind="method",
                 guess=3 * g)


