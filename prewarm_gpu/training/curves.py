"""The one curve recorder of the loop: per run, the loss curve, the accuracy curve, failure.

The losses stay on the device (:attr:`prewarm_gpu.training.step.TrainStep.losses`); the recorder
reads them at the curve points only, so the step loop syncs with the host about 100 times per
run, not once per step.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from .protocol import TrainConfig, TrainResult, curve_steps, steps_to_target

__all__ = ["Curves"]


class Curves:
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
