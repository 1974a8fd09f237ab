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
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state

from .bmm import BmmSimpleCNN
from .checkpoint import Checkpointer
from .data import EpochStream, ImageData
from .models import SimpleCNN, conv_blocks
from .precision import float32_scope
from .protocol import TrainConfig, TrainResult, curve_steps, steps_to_target
from .step import GRAPHS, TrainStep, make_runner

__all__ = ["train_batched", "choose_backend", "load_measured", "PRECISIONS", "BACKENDS",
           "MEASURED"]

PRECISIONS = ("fp32", "tf32", "bf16")


def _autocast(precision: str, device: torch.device):
    """The autocast region of one forward pass: bf16 autocast (BatchNorm and the loss stay fp32)
    for ``"bf16"``; nothing for fp32/tf32 (the trainer runs with autocast off).

    A fresh region per forward, with its weight-cast cache off: autocast casts each fp32 weight
    once and reuses the copy until the *outermost* region exits, so one region around the whole
    step loop (as before) trained on the step-0 bf16 weights forever (the loop backend learnt
    nothing; the grouped one froze its convolutions). The trainer's own autocast-off region is
    outermost here, so only a disabled cache keeps each forward on the current weights. The
    backward pass and Adam run outside, as PyTorch recommends. Cost, measured on the 2-core CPU
    (2 runs × 150 digits steps, loop backend, one thread, min of 3): 7.4 s with the cache off,
    6.5–6.9 s with a per-step region and the cache on, which is correct only where no caller's
    autocast region encloses the trainer.
    """
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def _float32_mode(precision: str) -> str:
    """The :func:`prewarm_gpu.precision.float32_scope` mode of a precision: TF32 for "tf32",
    IEEE otherwise (bf16's fp32 ops — BatchNorm, the loss, Adam — are IEEE too)."""
    return "tf32" if precision == "tf32" else "ieee"


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
        for p in m.parameters():
            if p.device != device:
                raise ValueError(f"a model is on {p.device} but the data is on {device}")


class GroupedSimpleCNN(nn.Module):
    """R SimpleCNNs as one network: the run axis folded into channels, ``groups=R`` convolutions.

    Input ``(B, R·C, H, W)`` (run r's batch in channels ``[r·C, (r+1)·C)``). A BatchNorm over R·F
    channels *is* R per-run BatchNorms (each run owns its channels); the linear layers are
    ``baddbmm`` over stacked ``(R, out, in)`` weights. Output ``(R, B, classes)``.
    """

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        m0 = models[0]
        self.R = R = len(models)
        self.conv1 = self._conv(m0.conv1, [m.conv1 for m in models], R)
        self.bn1 = self._bn([m.bn1 for m in models])
        self.conv2 = self._conv(m0.conv2, [m.conv2 for m in models], R)
        self.bn2 = self._bn([m.bn2 for m in models])
        self.fc1_w = nn.Parameter(torch.stack([m.fc1.weight.detach() for m in models]))
        self.fc1_b = nn.Parameter(torch.stack([m.fc1.bias.detach() for m in models]))
        self.fc2_w = nn.Parameter(torch.stack([m.fc2.weight.detach() for m in models]))
        self.fc2_b = nn.Parameter(torch.stack([m.fc2.bias.detach() for m in models]))
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()

    @staticmethod
    def _conv(c0: nn.Conv2d, convs: list[nn.Conv2d], R: int) -> nn.Conv2d:
        conv = nn.Conv2d(c0.in_channels * R, c0.out_channels * R, c0.kernel_size, c0.stride,
                         c0.padding, c0.dilation, groups=R, bias=c0.bias is not None,
                         device=c0.weight.device, dtype=c0.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(torch.cat([c.weight for c in convs]))
            if c0.bias is not None:
                conv.bias.copy_(torch.cat([c.bias for c in convs]))
        return conv

    @staticmethod
    def _bn(bns: list[nn.BatchNorm2d]) -> nn.BatchNorm2d:
        b0 = bns[0]
        bn = nn.BatchNorm2d(b0.num_features * len(bns), b0.eps, b0.momentum,
                            device=b0.weight.device, dtype=b0.weight.dtype)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, name).copy_(torch.cat([getattr(b, name) for b in bns]))
            bn.num_batches_tracked.copy_(b0.num_batches_tracked)
        return bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        x = conv_blocks(self, x)[1]  # SimpleCNN's blocks; groups=R keeps the runs apart
        x = x.reshape(B, self.R, -1).transpose(0, 1)  # (R, B, 64·h·w), each run's own flatten
        x = F.relu(torch.baddbmm(self.fc1_b[:, None], x, self.fc1_w.transpose(1, 2)))
        return torch.baddbmm(self.fc2_b[:, None], x, self.fc2_w.transpose(1, 2))

    @torch.no_grad()
    def write_back(self, models: list[nn.Module]) -> None:
        """Copy each run's slice of the stacked weights and buffers into its own model."""
        for r, m in enumerate(models):
            for name in ("conv1", "conv2"):
                src, dst = getattr(self, name), getattr(m, name)
                n = dst.out_channels
                dst.weight.copy_(src.weight[r * n : (r + 1) * n])
                if dst.bias is not None:
                    dst.bias.copy_(src.bias[r * n : (r + 1) * n])
            for name in ("bn1", "bn2"):
                src, dst = getattr(self, name), getattr(m, name)
                n = dst.num_features
                for t in ("weight", "bias", "running_mean", "running_var"):
                    getattr(dst, t).copy_(getattr(src, t)[r * n : (r + 1) * n])
                dst.num_batches_tracked.copy_(src.num_batches_tracked)
            m.fc1.weight.copy_(self.fc1_w[r])
            m.fc1.bias.copy_(self.fc1_b[r])
            m.fc2.weight.copy_(self.fc2_w[r])
            m.fc2.bias.copy_(self.fc2_b[r])


def _grouped_ok(models: list[nn.Module]) -> bool:
    return type(models[0]) is SimpleCNN


class _StackedLoss:
    """``train_loss`` of the stacks that produce (R, B, classes) logits (no auxiliary heads)."""

    def train_loss(self, x: torch.Tensor, y: torch.Tensor,
                   aux_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        per_run = _per_run_loss(self.train_logits(x).float(), y)
        return per_run, per_run


class _VmapStack(_StackedLoss):
    """Any architecture: ``stack_module_state`` + ``functional_call`` under ``vmap``."""

    def __init__(self, models: list[nn.Module]):
        self.params, self.buffers = stack_module_state(models)
        self.base = copy.deepcopy(models[0]).to("meta")

    def parameters(self):
        return list(self.params.values())

    def train_logits(self, x: torch.Tensor) -> torch.Tensor:  # x (R, B, C, H, W)
        self.base.train()
        return torch.vmap(self._one, in_dims=(0, 0, 0))(self.params, self.buffers, x)

    def state_dict(self) -> dict[str, Any]:
        return {"params": dict(self.params), "buffers": dict(self.buffers)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, t in (*state["params"].items(), *state["buffers"].items()):
            (self.params if name in self.params else self.buffers)[name].copy_(t)

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:  # x (M, C, H, W), shared
        self.base.eval()
        try:
            return torch.vmap(self._one, in_dims=(0, 0, None))(self.params, self.buffers, x)
        finally:
            self.base.train()

    def _one(self, p, b, x):
        return functional_call(self.base, (p, b), (x,))

    @torch.no_grad()
    def write_back(self, models: list[nn.Module]) -> None:
        for r, m in enumerate(models):
            for name, p in m.named_parameters():
                p.copy_(self.params[name][r])
            for name, b in m.named_buffers():
                b.copy_(self.buffers[name][r])


class _GroupedStack(_StackedLoss):
    """SimpleCNN: :class:`GroupedSimpleCNN` (channels_last on the CPU, where it pays)."""

    def __init__(self, models: list[nn.Module], channels_last: bool):
        self.net = GroupedSimpleCNN(models)
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.net = self.net.to(memory_format=self.fmt)

    def parameters(self):
        return list(self.net.parameters())

    def state_dict(self) -> dict[str, Any]:
        return self.net.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state)

    def _fold(self, x: torch.Tensor) -> torch.Tensor:  # (R, B, C, H, W) → (B, R·C, H, W)
        R, B, C, H, W = x.shape
        return x.transpose(0, 1).reshape(B, R * C, H, W).contiguous(memory_format=self.fmt)

    def train_logits(self, x: torch.Tensor) -> torch.Tensor:
        self.net.train()
        return self.net(self._fold(x))

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        self.net.eval()
        try:
            x = x.repeat(1, self.net.R, 1, 1).contiguous(memory_format=self.fmt)
            return self.net(x)
        finally:
            self.net.train()

    def write_back(self, models: list[nn.Module]) -> None:
        self.net.write_back(models)


class _BmmStack(_GroupedStack):
    """SimpleCNN: :class:`~prewarm_gpu.bmm.BmmSimpleCNN`, every layer one batched product over
    the runs, activations channels-last per run."""

    def __init__(self, models: list[nn.Module], image_size: tuple[int, int]):
        self.net = BmmSimpleCNN(models, image_size)

    def train_logits(self, x: torch.Tensor) -> torch.Tensor:  # (R, B, C, H, W)
        self.net.train()
        return self.net(x.permute(0, 1, 3, 4, 2))

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:  # (M, C, H, W), shared
        self.net.eval()
        try:
            x = x.permute(0, 2, 3, 1)  # channels-last, the same view for every run
            return self.net(x.expand(self.net.R, *x.shape))
        finally:
            self.net.train()


class _LoopStack:
    """Each run's own model and kernels, one after another inside the step; one Adam for all.

    The only form for models with auxiliary heads (deep supervision), and the fastest on the CPU,
    where a single run already keeps the cores busy and grouped kernels are slower than per-run
    ones (measured: 16 SimpleCNN runs on digits, 30 steps, one thread: loop ≈ single-run 8.8 s,
    grouped 12.4 s, vmap 18.7 s). One run of it *is* the single-run trainer.
    """

    def __init__(self, models: list[nn.Module], channels_last: bool):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.models = [m.to(memory_format=fmt) for m in models]
        self.fmt = fmt

    def parameters(self):
        return [p for m in self.models for p in m.parameters()]

    def train_loss(self, x: torch.Tensor, y: torch.Tensor,
                   aux_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        objective, main = zip(*(_loss(m, x[r].contiguous(memory_format=self.fmt), y[r],
                                      aux_weight) for r, m in enumerate(self.models)),
                              strict=True)
        return torch.stack(objective), torch.stack(main)

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=self.fmt)
        out = []
        for m in self.models:
            m.eval()
            out.append(m(x))
            m.train()
        return torch.stack(out)

    def state_dict(self) -> dict[str, Any]:
        return {"models": [m.state_dict() for m in self.models]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for m, sd in zip(self.models, state["models"], strict=True):
            m.load_state_dict(sd)

    def write_back(self, models: list[nn.Module]) -> None:
        pass  # trained in place


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
          aux_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective, main-head cross-entropy) of one run. The objective adds
    ``aux_weight · Σ CE(aux)`` for a deeply supervised model; the logged curve (and steps to
    target) is the main head's loss, so models with and without auxiliary heads are compared on
    the same quantity."""
    main = F.cross_entropy(model(x), y)
    aux = getattr(model, "aux_logits", None)
    if aux:  # deep supervision (a model's auxiliary heads, set by its forward in train mode)
        return main + aux_weight * sum(F.cross_entropy(a, y) for a in aux), main
    return main, main


BACKENDS = ("auto", "grouped", "vmap", "loop", "bmm")


# Measured speed of each backend, run-steps per second, SimpleCNN at batch 256: `auto` takes the
# fastest that can train the models. cuda: an H100 (2026-11, cifar10 sizes, fp32, the grouped /
# vmap / loop backends side by side; ../shared/notes/gpu-facts.md). cpu: this project's 2-core
# CPU (16 runs on digits, 30 steps, one thread: loop 8.8 s, grouped 12.4 s, vmap 18.7 s).
MEASURED: dict[str, dict[str, float]] = {
    "cuda": {"grouped": 911.0, "vmap": 656.0, "loop": 574.0},
    "cpu": {"loop": 54.5, "grouped": 38.7, "vmap": 25.7},
}


def load_measured(path: str) -> dict[str, dict[str, float]]:
    """Update :data:`MEASURED` from a ``bench_training.py`` (or GPU suite) JSON's ``measured``
    table (run-steps/s per device type and backend); returns the table now in use."""
    import json

    with open(path) as f:
        blob = json.load(f)
    table = blob.get("measured") or (blob.get("training") or {}).get("measured")
    if not isinstance(table, dict) or not table:
        raise ValueError(f"{path} has no 'measured' table of run-steps/s per backend")
    for device_type, speeds in table.items():
        unknown = set(speeds) - set(BACKENDS)
        if unknown:
            raise ValueError(f"{path}: unknown backends {sorted(unknown)}")
        MEASURED.setdefault(device_type, {}).update({b: float(v) for b, v in speeds.items()})
    return MEASURED


def _usable(models: list[nn.Module]) -> list[str]:
    """The backends that can train ``models``: auxiliary heads need the loop."""
    if any(hasattr(m, "aux_logits") for m in models):
        return ["loop"]
    return ["grouped", "vmap", "loop", "bmm"] if _grouped_ok(models) else ["vmap", "loop"]


def choose_backend(backend: str, models: list[nn.Module], device: torch.device) -> str:
    """``backend`` checked against the models; ``auto``: the fastest in :data:`MEASURED` for the
    device type (the loop where nothing was measured) among those that can train them."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    usable = _usable(models)
    if backend == "auto":
        speed = MEASURED.get(torch.device(device).type, {})
        return max(usable, key=lambda b: (speed.get(b, 0.0), b == "loop"))
    if backend not in usable:
        raise ValueError(f"the {backend} backend cannot train {type(models[0]).__name__}"
                         + (" (auxiliary heads need the loop backend)"
                            if usable == ["loop"] else "; it handles SimpleCNN only"))
    return backend


def _choose(backend: str, models: list[nn.Module], device: torch.device,
            channels_last: bool | None = None, image_size: tuple[int, int] | None = None):
    """The stack for ``backend`` (see :func:`choose_backend`); ``channels_last`` defaults to
    True on the CPU, where it pays; ``image_size`` (H, W) is the data's (the bmm stack needs it)."""
    backend = choose_backend(backend, models, device)
    if backend == "bmm":
        return _BmmStack(models, image_size)
    if channels_last is None:
        channels_last = device.type == "cpu"
    if backend == "grouped":
        return _GroupedStack(models, channels_last=channels_last)
    if backend == "loop":
        return _LoopStack(models, channels_last=channels_last)
    return _VmapStack(models)


def train_batched(
    models: list[nn.Module],
    data: ImageData,
    config: TrainConfig,
    *,
    seeds: list[int],
    precision: str = "fp32",
    backend: str = "auto",
    channels_last: bool | None = None,
    checkpoint: Checkpointer | None = None,
    progress: Callable[[int], None] | None = None,
    graphs: str = "auto",
    compile: bool = False,
) -> list[TrainResult]:
    """Train ``models`` (one per seed in ``seeds``) together; returns one result per run.

    The one training loop of the project: :func:`prewarm_gpu.train.train` is this with one run.
    Each run draws batches from its own seed's data order, and its trained weights are written
    back into its model. A run whose loss turns NaN/Inf is marked failed at that step; the others
    go on (they share no arithmetic with it).

    The step loop does not sync with the host: batch indices, standardisation, the loss, the
    backward pass and a fused Adam step are queued on the device, and the per-step losses stay
    there. The host reads them only at the curve points (:func:`curves_at`), evaluates at the
    accuracy points, and writes a checkpoint when ``checkpoint`` says one is due.

    Args:
        models: initialised models of one architecture, on ``data.device``.
        data: the dataset (uint8 on its device).
        config: the protocol (shared by all runs).
        seeds: the data-order seed of each run.
        precision: ``"fp32"`` (default, as the paper: IEEE float32, TF32 off on CUDA),
            ``"tf32"`` (TF32 convolutions and matmuls on CUDA) or ``"bf16"`` (autocast around
            each forward pass). Every precision runs with cuDNN deterministic and benchmark off;
            the caller's flags are restored after (:mod:`prewarm_gpu.precision`).
        backend: ``"grouped"`` (SimpleCNN only: :class:`GroupedSimpleCNN`), ``"vmap"`` (any
            architecture without auxiliary heads), ``"loop"`` (per-run kernels in one step; any
            model) or ``"auto"``: the fastest measured (:data:`MEASURED`).
        channels_last: models in NHWC (default: on the CPU); the grouped and loop backends.
        checkpoint: where and how often to checkpoint; a usable checkpoint found there is
            continued from (bit-identical to an uninterrupted run on the CPU).
        progress: called with the number of run-steps done since its last call.
        graphs: ``"auto"`` (on CUDA), ``"on"`` or ``"off"``: the step
            (:meth:`prewarm_gpu.step.TrainStep.step`) captured once as a CUDA graph and replayed,
            else run eagerly; the same arithmetic either way (:mod:`prewarm_gpu.step`).
        compile: the step's forward (and so its backward) through ``torch.compile``.
    """
    cfg, dev = config, data.device
    _check_models(models, seeds, dev)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if graphs not in GRAPHS:
        raise ValueError(f"graphs must be one of {GRAPHS}, got {graphs!r}")
    # Autocast off around everything (a caller's region would otherwise lower fp32's forward
    # and every backward matmul); bf16 turns it on for each forward pass alone.
    with float32_scope(_float32_mode(precision)), torch.autocast(dev.type, enabled=False):
        return _train(models, data, cfg, seeds, precision, backend, channels_last, checkpoint,
                      progress, graphs, compile)


def _train(models, data, cfg, seeds, precision, backend, channels_last, checkpoint, progress,
           graphs, compile):
    """:func:`train_batched` on valid input, inside its float32 scope."""
    dev = data.device
    t0 = time.perf_counter()
    R = len(models)
    for m in models:
        m.train()
    stack = _choose(backend, models, dev, channels_last, tuple(data.train_x.shape[-2:]))
    ts = TrainStep(stack, data, cfg, R, lambda: _autocast(precision, dev),
                   capturable=dev.type == "cuda", compile=compile)
    streams = [EpochStream(data.train_x.shape[0], cfg.batch_size,
                           torch.Generator(device=dev).manual_seed(s)) for s in seeds]
    losses = ts.losses
    curves = _Curves(R, cfg)
    resumed = checkpoint.load() if checkpoint is not None else None
    if resumed is None:
        start = 0
        curves.accuracy(0, _evaluate(stack, data, cfg, precision))
    else:
        start, state = resumed
        stack.load_state_dict(state["stack"])
        ts.load_state_dict(state, start)
        for st, sd in zip(streams, state["streams"], strict=True):
            st.load_state_dict(sd)
        losses[:start] = state["losses"].to(dev)
        curves.load_state_dict(state["curves"])
        if progress:
            progress(R * start)
    marks = curves.marks
    run_step = make_runner(ts, graphs, dev)
    for t in range(start, cfg.steps):
        step = t + 1
        run_step(torch.stack([next(s) for s in streams]))  # (R, B) batch indices, drawn here
        if step in marks:
            before = curves.done
            curves.losses(step, losses)  # the host read of this point
            if step in curves.acc_marks:
                curves.accuracy(step, _evaluate(stack, data, cfg, precision))
            if progress:
                progress(R * (step - before))
            if not any(curves.alive):
                break
        if checkpoint is not None and step < cfg.steps and checkpoint.due(step):
            checkpoint.save(step, {
                "stack": stack.state_dict(), **ts.state_dict(),
                "streams": [st.state_dict() for st in streams],
                "losses": losses[:step].cpu(), "curves": curves.state_dict()})
    if progress and curves.done < cfg.steps:
        progress(R * (cfg.steps - curves.done))  # the steps failed runs will not take
    stack.write_back(models)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    for r in curves.results:
        r.seconds = seconds / R  # wall time shared equally among the runs of the batch
    return curves.finish()


class _Curves:
    """The one curve recorder: per run, the training-loss curve (window means at the
    ``loss_points`` marks), test accuracy at the ``eval_points`` marks (plus step 0), and failure
    at the first non-finite loss. Loss and accuracy marks are independent: a mark of either kind
    reads the losses since the last one."""

    def __init__(self, R: int, cfg: TrainConfig):
        self.cfg = cfg
        self.loss_marks = set(curve_steps(cfg.steps, cfg.loss_points))
        self.acc_marks = set(curve_steps(cfg.steps, cfg.eval_points))
        self.marks = self.loss_marks | self.acc_marks
        self.results = [TrainResult("ok", None) for _ in range(R)]
        self.alive = [True] * R
        self.done = 0  # losses[:done] are read and known finite for the live runs
        self.window = 0  # the open loss window starts here

    def losses(self, step: int, losses: torch.Tensor) -> None:
        """Read ``losses[window:step]`` (one host copy); fail runs with a non-finite loss since
        the last mark; close the loss window at a loss mark."""
        block = losses[self.window : step].cpu()  # (step − window, R)
        fresh = block[self.done - self.window :]
        for r, res in enumerate(self.results):
            if not self.alive[r]:
                continue
            bad = (~torch.isfinite(fresh[:, r])).nonzero()
            if bad.numel():
                self.alive[r] = False
                res.status, res.failed_step = "failed", self.done + int(bad[0]) + 1
                res.error = f"non-finite training loss at step {res.failed_step}"
            elif step in self.loss_marks:
                res.loss_steps.append(step)
                res.loss.append(float(block[:, r].to(torch.float64).mean()))
        self.done = step
        if step in self.loss_marks:
            self.window = step

    def accuracy(self, step: int, accs: list[float]) -> None:
        for r, res in enumerate(self.results):
            if self.alive[r]:
                res.acc_steps.append(step)
                res.test_acc.append(accs[r])

    def state_dict(self) -> dict[str, Any]:
        return {"results": [asdict(r) for r in self.results], "alive": list(self.alive),
                "done": self.done, "window": self.window}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.results = [TrainResult(**r) for r in state["results"]]
        self.alive, self.done, self.window = list(state["alive"]), state["done"], state["window"]

    def finish(self) -> list[TrainResult]:
        for r in self.results:
            if r.status == "ok":
                r.accuracy = r.test_acc[-1]
            r.steps_to_target = steps_to_target(r.loss_steps, r.loss, self.cfg.target_loss)
        return self.results


_per_run_loss = torch.vmap(F.cross_entropy)  # each run's mean loss, as the single-run trainer's


@torch.no_grad()
def _evaluate(stack, data: ImageData, cfg: TrainConfig, precision: str) -> list[float]:
    """Test accuracy of every run (eval mode: running statistics, no buffer updates), in the
    run's precision."""
    correct = None
    for i in range(0, data.test_x.shape[0], cfg.eval_batch_size):
        x = data.standardise(data.test_x[i : i + cfg.eval_batch_size])
        with _autocast(precision, data.device):
            logits = stack.eval_logits(x)  # (R, M, classes)
        hits = (logits.argmax(-1) == data.test_y[i : i + cfg.eval_batch_size]).sum(1)
        correct = hits if correct is None else correct + hits
    return (correct.double() / data.test_x.shape[0]).tolist()
