"""Many runs of the paper's protocol at once: one stacked model, one step for all of them.

All runs of a dataset (seeds × arms) share the architecture, the optimiser and the schedule, so they
train as one model whose every parameter and buffer has a leading run axis
(``torch.func.stack_module_state``), called with ``torch.func.functional_call`` under
``torch.vmap``. Nothing couples the runs:

- each run draws its batches from its own seed's data order (the single-run trainer's order);
- BatchNorm statistics are per run (the running buffers are stacked; vmap updates each run's own);
- the loss is the *sum* of the per-run mean losses, so each run's gradient is its own;
- Adam is elementwise, so one Adam over stacked tensors is N independent Adams (no global-norm
  clipping); the cosine schedule is one scalar shared by all runs.

The step loop never syncs with the host: losses stay on the device and are read back at the curve
points, as in :func:`prewarm_gpu.train.train`. In fp32 the results equal the single-run trainer's to
float rounding (tested). Models that expose ``aux_logits`` (deep supervision) are not batched: use
the single-run trainer for them.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state

from .data import ImageData, epoch_stream
from .train import TrainConfig, TrainResult, curve_steps

__all__ = ["train_batched", "PRECISIONS"]

PRECISIONS = ("fp32", "tf32", "bf16")


@contextlib.contextmanager
def _precision(precision: str, device: torch.device):
    """fp32: exact; tf32: TF32 matmuls and convolutions; bf16: autocast (BatchNorm stays fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        yield
        return
    if precision == "tf32":
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
        return
    with torch.autocast(device.type, dtype=torch.bfloat16):
        yield


def _check_models(models: list[nn.Module], seeds: list[int], device: torch.device) -> None:
    if not models:
        raise ValueError("no models to train")
    if len(models) != len(seeds):
        raise ValueError(f"{len(models)} models but {len(seeds)} seeds; one seed per run")
    shapes = [(n, tuple(p.shape)) for n, p in models[0].state_dict().items()]
    for m in models[1:]:
        if type(m) is not type(models[0]) or \
                [(n, tuple(p.shape)) for n, p in m.state_dict().items()] != shapes:
            raise ValueError("batched training needs models of one architecture")
    for m in models:
        if hasattr(m, "aux_logits"):
            raise ValueError(f"{type(m).__name__} has auxiliary heads; train it with the "
                             "single-run trainer (--no-batch)")
        for p in m.parameters():
            if p.device != device:
                raise ValueError(f"a model is on {p.device} but the data is on {device}")


def train_batched(
    models: list[nn.Module],
    data: ImageData,
    config: TrainConfig,
    *,
    seeds: list[int],
    precision: str = "fp32",
    progress: Callable[[int], None] | None = None,
) -> list[TrainResult]:
    """Train ``models`` (one per seed in ``seeds``) together; returns one result per run.

    Each run uses the protocol and the data order of :func:`prewarm_gpu.train.train` with its seed,
    and its trained weights are written back into its model. A run whose loss turns NaN/Inf is
    marked failed at that step; the others go on (they share no arithmetic with it).

    Args:
        models: initialised models of one architecture, on ``data.device``.
        data: the dataset (uint8 on its device).
        config: the protocol (shared by all runs).
        seeds: the data-order seed of each run.
        precision: ``"fp32"`` (default, as the paper), ``"tf32"`` or ``"bf16"`` (autocast).
        progress: called with the number of run-steps done since its last call.
    """
    cfg, dev = config, data.device
    _check_models(models, seeds, dev)
    t0 = time.perf_counter()
    R = len(models)
    for m in models:
        m.train()
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def run_one(p, b, x):
        return functional_call(base, (p, b), (x,))

    forward = torch.vmap(run_one, in_dims=(0, 0, 0))
    opt = torch.optim.Adam(list(params.values()), lr=cfg.lr_start)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=cfg.lr_end)
    streams = [epoch_stream(data.train_x.shape[0], cfg.batch_size,
                            torch.Generator(device=dev).manual_seed(s)) for s in seeds]
    losses = torch.empty(cfg.steps, R, dtype=torch.float32, device=dev)
    loss_marks = curve_steps(cfg.steps, cfg.loss_points)
    acc_marks = set(curve_steps(cfg.steps, cfg.eval_points))
    results = [TrainResult("ok", None, acc_steps=[0]) for _ in range(R)]
    for r, a in zip(results, _evaluate(base, params, buffers, data, cfg), strict=True):
        r.test_acc.append(a)
    alive = [True] * R
    done, mark = 0, 0
    with _precision(precision, dev):
        for t in range(cfg.steps):
            idx = torch.stack([next(s) for s in streams])  # (R, B)
            x = data.standardise(data.train_x[idx.reshape(-1)])
            x = x.reshape(R, cfg.batch_size, *x.shape[1:])
            y = data.train_y[idx]
            logits = forward(params, buffers, x)  # (R, B, classes)
            per_run = _per_run_loss(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            per_run.sum().backward()
            opt.step()
            sched.step()
            losses[t] = per_run.detach()
            if t + 1 != loss_marks[mark]:
                continue
            window = losses[done : t + 1].cpu()
            for r in range(R):
                if not alive[r]:
                    continue
                bad = (~torch.isfinite(window[:, r])).nonzero()
                if bad.numel():
                    alive[r] = False
                    res = results[r]
                    res.status, res.failed_step = "failed", done + int(bad[0]) + 1
                    res.error = f"non-finite training loss at step {res.failed_step}"
                    continue
                results[r].loss_steps.append(t + 1)
                results[r].loss.append(float(window[:, r].to(torch.float64).mean()))
                if results[r].steps_to_target is None and results[r].loss[-1] < cfg.target_loss:
                    results[r].steps_to_target = t + 1
            if t + 1 in acc_marks:
                accs = _evaluate(base, params, buffers, data, cfg)
                for r in range(R):
                    if alive[r]:
                        results[r].acc_steps.append(t + 1)
                        results[r].test_acc.append(accs[r])
            if progress:
                progress(R * (t + 1 - done))
            done, mark = t + 1, mark + 1
            if not any(alive):
                if progress:
                    progress(R * (cfg.steps - done))
                break
    _write_back(models, params, buffers)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    for r in results:
        if r.status == "ok":
            r.accuracy = r.test_acc[-1]
        r.seconds = seconds / R  # wall time shared equally among the runs of the batch
    return results


_per_run_loss = torch.vmap(F.cross_entropy)  # each run's mean loss, as the single-run trainer's


@torch.no_grad()
def _evaluate(base, params, buffers, data: ImageData, cfg: TrainConfig) -> list[float]:
    """Test accuracy of every run (eval mode: running statistics, no buffer updates)."""
    base.eval()
    R = next(iter(params.values())).shape[0]

    def run_one(p, b, x):
        return functional_call(base, (p, b), (x,))

    correct = torch.zeros(R, dtype=torch.long, device=data.device)
    try:
        for i in range(0, data.test_x.shape[0], cfg.eval_batch_size):
            x = data.standardise(data.test_x[i : i + cfg.eval_batch_size])
            logits = torch.vmap(run_one, in_dims=(0, 0, None))(params, buffers, x)
            correct += (logits.argmax(-1) == data.test_y[i : i + cfg.eval_batch_size]).sum(1)
    finally:
        base.train()
    return (correct.double() / data.test_x.shape[0]).tolist()


@torch.no_grad()
def _write_back(models, params, buffers) -> None:
    """Copy each run's trained parameters and buffers back into its own model."""
    for r, m in enumerate(models):
        for name, p in m.named_parameters():
            p.copy_(params[name][r])
        for name, b in m.named_buffers():
            b.copy_(buffers[name][r])
