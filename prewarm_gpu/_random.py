"""One random source: ``None | int | torch.Generator``, normalised once on the data's device."""

from __future__ import annotations

import numbers

import torch


def as_generator(generator: int | torch.Generator | None, device: torch.device) -> torch.Generator:
    """Return a ``torch.Generator`` on ``device``; never reads or writes global RNG state.

    ``None`` gives a freshly (non-deterministically) seeded generator, an ``int`` a generator seeded
    with it, and a ``torch.Generator`` is used as is (it must live on ``device``).
    """
    device = torch.device(device)
    if isinstance(generator, torch.Generator):
        if torch.device(generator.device).type != device.type:
            raise ValueError(
                f"generator is on {generator.device} but the data is on {device}; "
                f"pass a torch.Generator(device='{device.type}') or an int seed"
            )
        return generator
    g = torch.Generator(device=device)
    if generator is None:
        g.seed()
    elif isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        if not 0 <= generator < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {generator}")
        g.manual_seed(int(generator))
    else:
        raise TypeError(
            "generator must be None, an int seed or a torch.Generator, "
            f"got {type(generator).__name__}"
        )
    return g
