"""The stacks: R runs of one architecture as one trainable object, one class per backend.

A stack is what the loop (:mod:`prewarm_gpu.training.loop`) and the step
(:class:`prewarm_gpu.training.step.TrainStep`) call; every backend's stack has

- ``parameters()``: every run's parameters (one fused Adam steps them all);
- ``train_loss(x, y, aux_weight) -> (objective, main)``: ``x`` (R, B, C, H, W) and ``y`` (R, B),
  each run's own batch; two (R,) tensors, the objective each run minimises and its main head's
  cross-entropy (the logged curve);
- ``eval_logits(x) -> (R, M, classes)``: every run on the same test images ``x`` (M, C, H, W), in
  eval mode (running statistics, no buffer update), back in train mode after;
- ``state_dict()`` / ``load_state_dict(state)``: what a checkpoint holds of the runs;
- ``write_back(models)``: each run's trained weights and buffers into its own model.

Nothing couples the runs: each run's loss is its own mean, the objective is summed over runs, and
Adam is elementwise, so each run's gradient and update are its own. Which backend trains which
models, and which ``auto`` picks, is :mod:`prewarm_gpu.training.backends`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state

from .bmm import BmmSimpleCNN
from .grouped import GroupedSimpleCNN

__all__ = ["VmapStack", "GroupedStack", "BmmStack", "LoopStack", "run_loss"]

_per_run_loss = torch.vmap(F.cross_entropy)  # each run's mean loss, as the single-run trainer's


class StackedLoss:
    """``train_loss`` of the stacks that produce (R, B, classes) logits (no auxiliary heads)."""

    def train_loss(self, x: torch.Tensor, y: torch.Tensor,
                   aux_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        per_run = _per_run_loss(self.train_logits(x).float(), y)
        return per_run, per_run


class VmapStack(StackedLoss):
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


class GroupedStack(StackedLoss):
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


class BmmStack(GroupedStack):
    """SimpleCNN: :class:`~prewarm_gpu.training.bmm.BmmSimpleCNN`, every layer one batched
    product over the runs, activations channels-last per run."""

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


class LoopStack:
    """Each run's own model and kernels, one after another inside the step; one Adam for all.

    The only form for models with auxiliary heads (deep supervision), and the fastest on the CPU,
    where a single run already keeps the cores busy and grouped kernels are slower than per-run
    ones (the CPU row of :data:`~prewarm_gpu.training.backends.MEASURED`). One run of it *is* the
    single-run trainer.
    """

    def __init__(self, models: list[nn.Module], channels_last: bool):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.models = [m.to(memory_format=fmt) for m in models]
        self.fmt = fmt

    def parameters(self):
        return [p for m in self.models for p in m.parameters()]

    def train_loss(self, x: torch.Tensor, y: torch.Tensor,
                   aux_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        objective, main = zip(*(run_loss(m, x[r].contiguous(memory_format=self.fmt), y[r],
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


def run_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
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
