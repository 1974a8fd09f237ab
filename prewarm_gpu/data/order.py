"""The seeded data order: full batches of indices from per-epoch permutations."""

from __future__ import annotations

import torch

__all__ = ["EpochStream", "epoch_stream", "first_batch_indices"]


class EpochStream:
    """Batches of indices, forever: consecutive ``batch_size`` slices of a stream of per-epoch
    ``randperm(n)`` drawn on the generator's device. Every batch is full (a batch may straddle two
    epochs), so the order depends only on the seed, ``n`` and ``batch_size``. Its position is a
    :meth:`state_dict` (the generator's state and the unread indices), so a training run can stop
    and go on bit-identically."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.buf = torch.empty(0, dtype=torch.long, device=generator.device)

    def __iter__(self) -> EpochStream:
        return self

    def __next__(self) -> torch.Tensor:
        while self.buf.numel() < self.batch_size:
            perm = torch.randperm(self.n, generator=self.generator, device=self.generator.device)
            self.buf = torch.cat([self.buf, perm])
        batch, self.buf = self.buf[: self.batch_size], self.buf[self.batch_size :]
        return batch

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state(), "buf": self.buf.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self.buf = state["buf"].to(self.generator.device)


def epoch_stream(n: int, batch_size: int, generator: torch.Generator) -> EpochStream:
    """The seeded data order (:class:`EpochStream`)."""
    return EpochStream(n, batch_size, generator)


def first_batch_indices(n: int, batch_size: int, seed: int,
                        device: str | torch.device) -> torch.Tensor:
    """The first training batch of seed ``seed`` (what Pre-Warm sees), without consuming the
    training order: the same as the first item of ``epoch_stream`` on a fresh generator."""
    g = torch.Generator(device=device).manual_seed(seed)
    return next(epoch_stream(n, batch_size, g))
