"""One random source: ``None | int | torch.Generator``, normalised once on the data's device."""

from __future__ import annotations

import torch

from .checks import is_int


def _is_default(g: torch.Generator) -> bool:
    """Whether ``g`` is the CPU's or a CUDA device's global default generator."""
    if g is torch.default_generator:
        return True
    if torch.device(g.device).type == "cuda" and torch.cuda.is_available():
        return any(g is d for d in torch.cuda.default_generators)
    return False


def as_generator(generator: int | torch.Generator | None, device: torch.device) -> torch.Generator:
    """Return a ``torch.Generator`` on ``device``; never reads or writes global RNG state.

    ``None`` gives a freshly (non-deterministically) seeded generator, an ``int`` a generator seeded
    with it, and a ``torch.Generator`` is used as is (it must live on ``device``, and must not be
    torch's global default generator: using it would advance the global RNG).
    """
    device = torch.device(device)
    if isinstance(generator, torch.Generator):
        if _is_default(generator):
            raise ValueError("generator is torch's global default generator, which this library "
                             "never advances; pass an int seed or your own torch.Generator")
        if torch.device(generator.device).type != device.type:
            raise ValueError(
                f"generator is on {generator.device} but the data is on {device}; "
                f"pass a torch.Generator(device='{device.type}') or an int seed"
            )
        return generator
    g = torch.Generator(device=device)
    if generator is None:
        g.seed()
    elif is_int(generator):
        if not 0 <= generator < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {generator}")
        g.manual_seed(int(generator))
    else:
        raise TypeError(
            "generator must be None, an int seed or a torch.Generator, "
            f"got {type(generator).__name__}"
        )
    return g
