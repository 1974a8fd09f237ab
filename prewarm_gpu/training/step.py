"""One training step as a pure function of device tensors, replayable as a CUDA graph.

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026), §3.3: Adam, cross-entropy, a cosine schedule. :class:`TrainStep` holds everything a step
reads and writes on the device — the stacked model, a fused Adam, the step counter ``t``, the
learning-rate table, the batch indices (a static buffer the host fills before each step) and the
per-step losses — and :meth:`TrainStep.step` is the step: no host sync, no Python branch on a
tensor's value, fixed shapes. So the same function runs eagerly (the CPU, or ``graphs=False``) or
is captured once and replayed (:class:`GraphedStep`, CUDA), and the two are the same arithmetic.

The learning rate of step t is ``lr[t]``, a float64 table of the values PyTorch's
``CosineAnnealingLR`` gives (its recursive form, so results are the bits of a loop that calls
``scheduler.step()``; the closed form ``η_end + (η_start − η_end)(1 + cos(π t/T))/2`` differs in
the last bits), read on the device at the counter's index.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from .protocol import TrainConfig

__all__ = ["lr_table", "TrainStep", "GraphedStep", "make_runner", "GRAPHS"]

GRAPHS = ("auto", "on", "off")


def lr_table(cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    """(steps,) float64: the learning rate of each step, as ``CosineAnnealingLR(T_max=T,
    eta_min=η_end)`` sets it after ``t`` scheduler steps (T = ``cfg.t_max``)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr_start)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.t_max, eta_min=cfg.lr_end)
    values = []
    with warnings.catch_warnings():  # the schedule alone: no optimiser step (and no tensor op)
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
        for _ in range(cfg.steps):
            values.append(opt.param_groups[0]["lr"])
            sched.step()
    return torch.tensor(values, dtype=torch.float64, device=device)


class TrainStep:
    """A step's state on the device, and the step (:meth:`step`).

    Args:
        stack: the stacked runs (``parameters()``, ``train_loss(x, y, aux_weight)``).
        data: the dataset; ``standardise`` and the uint8 training split.
        cfg: the protocol.
        runs: R, the runs trained together.
        autocast: a zero-argument context factory for the forward pass (bf16 autocast, or none).
        capturable: Adam's state on the device (CUDA), as a captured graph needs.
        compile: the forward pass (:meth:`loss`) through ``torch.compile`` (default mode, fixed
            shapes); its backward is compiled with it. Measured no faster on the CPU.
    """

    def __init__(self, stack, data, cfg: TrainConfig, runs: int,
                 autocast: Callable[[], object], capturable: bool, compile: bool = False):
        dev = data.device
        self.stack, self.data, self.cfg, self.autocast = stack, data, cfg, autocast
        self.lr = lr_table(cfg, dev)
        self.lr_now = self.lr[:1].clone()  # Adam's lr: a (1,) buffer the step fills from the table
        self.opt = torch.optim.Adam(stack.parameters(), fused=True, capturable=capturable,
                                    lr=self.lr_now.view(()))
        self.t = torch.zeros(1, dtype=torch.long, device=dev)  # the step about to run, 0-based
        self.idx = torch.zeros(runs, cfg.batch_size, dtype=torch.long, device=dev)  # (R, B)
        self.losses = torch.empty(cfg.steps, runs, dtype=torch.float32, device=dev)
        if compile:
            self.loss = torch.compile(self.loss, dynamic=False)

    def step(self) -> None:
        """Step ``t`` on the batches ``idx``: forward, backward, Adam at ``lr[t]``; the main
        head's loss per run into ``losses[t]`` (the objective where that is not finite, so a
        NaN/Inf objective fails its run); ``t += 1``. Gradients must be None or zero before."""
        objective, main = self.loss()
        objective.sum().backward()
        torch.index_select(self.lr, 0, self.t, out=self.lr_now)  # lr[t], on the device
        self.opt.step()
        self.record(objective, main)

    def loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward pass of step ``t``: (objective, main head's loss), each (R,)."""
        R, B = self.idx.shape
        x = self.data.standardise(self.data.train_x[self.idx.view(-1)])
        x = x.view(R, B, *x.shape[1:])
        with self.autocast():
            return self.stack.train_loss(x, self.data.train_y[self.idx], self.cfg.aux_weight)

    def record(self, objective: torch.Tensor, main: torch.Tensor) -> None:
        """``losses[t]`` ← the main loss (the objective where that is not finite); ``t += 1``."""
        with torch.no_grad():
            value = torch.where(torch.isfinite(objective), main, objective)
            self.losses.index_put_((self.t,), value.to(self.losses.dtype))  # fp32: no op
        self.t.add_(1)

    def eager(self, idx: torch.Tensor) -> None:
        """One step, eagerly, on the batch indices ``idx`` (R, B) (read in place: the static
        buffer is for a captured graph)."""
        self.idx = idx
        self.opt.zero_grad(set_to_none=True)
        self.step()

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict, start: int) -> None:
        """The optimiser's state of a checkpoint after ``start`` steps (a checkpoint's schedule
        state, if it has one, is implied by ``start``)."""
        self.opt.load_state_dict(state["opt"])
        for group in self.opt.param_groups:  # loading replaced the lr by a copy: the buffer again
            group["lr"] = self.lr_now.view(())
        self.t.fill_(start)


class GraphedStep:
    """:meth:`TrainStep.step` captured once as a CUDA graph and replayed (PyTorch's whole-step
    capture: warm-up steps on a side stream, gradients set to None before capture so the graph
    owns them, the batch indices copied into the static buffer before each replay).

    The first ``warmup`` calls are real steps, run eagerly on a side stream; the next captures
    and replays. A capture that fails falls back to eager steps with one warning naming the cause.
    """

    def __init__(self, ts: TrainStep, warmup: int = 3):
        self.ts, self.warmup, self.graph, self.failed = ts, warmup, None, None
        self.calls = 0
        self.static = ts.idx  # the graph's input: the host copies each step's indices in

    def __call__(self, idx: torch.Tensor) -> None:
        if self.failed is not None:
            return self.ts.eager(idx)
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            side = torch.cuda.Stream(device=idx.device)
            side.wait_stream(torch.cuda.current_stream(idx.device))
            with torch.cuda.stream(side):
                self.ts.eager(idx)
            torch.cuda.current_stream(idx.device).wait_stream(side)
            return None
        self.static.copy_(idx)
        if self.graph is None:
            self._capture()
            if self.failed is not None:
                return self.ts.eager(idx)
        self.graph.replay()
        return None

    def _capture(self) -> None:
        try:
            self.ts.idx = self.static
            self.ts.opt.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.ts.step()
            self.graph = graph
        except Exception as e:  # noqa: BLE001 — any capture failure: eager, said once
            self.failed = e
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            warnings.warn(f"the training step could not be captured as a CUDA graph "
                          f"({type(e).__name__}: {e}); training goes on eagerly", stacklevel=3)


def make_runner(ts: TrainStep, graphs: str, device: torch.device):
    """The function that runs one step on batch indices: :class:`GraphedStep` where ``graphs``
    is ``"on"``, or ``"auto"`` on CUDA; else :meth:`TrainStep.eager`. ``"on"`` off CUDA is an
    error (a CUDA graph needs a CUDA device)."""
    if graphs not in GRAPHS:
        raise ValueError(f"graphs must be one of {GRAPHS}, got {graphs!r}")
    on_cuda = device.type == "cuda"
    if graphs == "on" and not on_cuda:
        raise ValueError(f"graphs='on' needs a CUDA device, got {device}")
    return GraphedStep(ts) if graphs == "on" or (graphs == "auto" and on_cuda) else ts.eager
