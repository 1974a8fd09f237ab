"""Finding the conv an initialiser writes: one finder for Pre-Warm, the Gabor bank and the plots."""

from __future__ import annotations

from torch import nn

__all__ = ["find_conv", "conv_label", "refuse_lazy"]


def conv_label(name: str) -> str:
    """How messages name a conv: ``conv 'features.0'``, or ``the conv`` for a bare one."""
    return f"conv {name!r}" if name else "the conv"


def refuse_lazy(conv: nn.Conv2d, name: str, searching: bool = False) -> None:
    """A ``ValueError`` for a lazy conv before its first forward pass: it has no weight (nor,
    when ``searching`` for the target by its in_channels, any in_channels to match)."""
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        why = ", so its in_channels are unknown" if searching else ""
        raise ValueError(
            f"{conv_label(name)} is a lazy conv whose weight is not initialised yet{why}; run one "
            "forward pass before initialising it" + (", or name the target with layer="
                                                     if searching else "")
        )


def find_conv(model: nn.Module, in_channels: int | None = None,
              layer: str | None = None) -> tuple[str, nn.Conv2d]:
    """``(name, conv)``: the ``nn.Conv2d`` named ``layer``; else the first one (in
    ``named_modules`` order) with ``in_channels`` input channels, or the first one of all when
    ``in_channels`` is None. A bare ``nn.Conv2d`` is its own target (name ``""``).

    Raises:
        ValueError: no such module, no matching conv, or a lazy conv where one is needed.
        TypeError: ``layer`` names a module that is not an ``nn.Conv2d``.
    """
    if isinstance(model, nn.Conv2d) and layer is None:
        return "", model
    if layer is not None:
        try:
            conv = model.get_submodule(layer)
        except AttributeError:
            names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
            raise ValueError(f"model has no module named {layer!r}; its Conv2d layers: {names}") \
                from None
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"layer {layer!r} is a {type(conv).__name__}, not an nn.Conv2d")
        return layer, conv
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        if in_channels is None:
            refuse_lazy(m, name)
            return name, m
        if m.in_channels == in_channels:
            return name, m
        refuse_lazy(m, name, searching=True)
    if in_channels is None:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d layer")
    raise ValueError(
        f"model has no nn.Conv2d with in_channels={in_channels} (the images' channels); "
        "pass layer='name' to choose one"
    )
