"""The registries: initialisations (name → ``fn(model, *, data=None, generator=None, **options)``)
and architectures (name → ``factory(in_channels=, n_classes=, image_size=)``).

This module imports nothing from the package and no third-party library, so any module can
register into it without an import circle. The package's ``__init__`` imports every module that
registers a built-in entry (:mod:`prewarm_gpu.initializers`, :mod:`prewarm_gpu.methods`,
:mod:`prewarm_gpu.models`), and importing any ``prewarm_gpu`` module runs that ``__init__`` first:
the tables are complete whatever a user imports first.

Every initialiser mutates ``model`` in place (under ``torch.no_grad()``) and returns a dict of what
it did (a report; may be empty). ``data`` is a batch of training images on the model's device —
standardised images as the network sees them — or, where a method needs more, a ``dict`` with
``images`` (the standardised batch) and ``raw`` (the same batch as raw [0, 1] pixels): see
:func:`split_data`. ``generator`` is ``None``, an ``int`` seed or a ``torch.Generator`` on the
model's device. Methods that need data raise a ``ValueError`` when ``data`` is missing.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["INITIALIZERS", "MODELS", "register", "register_model", "get", "get_model",
           "accepted_options", "check_options", "split_data"]

Initializer = Callable[..., dict[str, Any]]
ModelFactory = Callable[..., Any]  # returns an nn.Module whose first conv is `conv1`
INITIALIZERS: dict[str, Initializer] = {}
MODELS: dict[str, ModelFactory] = {}


def register(name: str, *, options_of: Callable | Iterable[Callable | str] | None = None,
             fixed: tuple[str, ...] = (), version: int = 1) -> Callable[[Initializer], Initializer]:
    """Decorator: add ``fn`` to :data:`INITIALIZERS` under ``name`` (warns on overwrite).

    ``options_of``: the function(s) whose keywords ``fn`` forwards its ``**options`` to, and/or
    option names, so that :func:`check_options` can validate options before any training;
    ``fixed``: keywords that ``fn`` sets itself and a user may not pass; ``version``: bump it when
    a change to ``fn``'s code (or to what it calls) changes its results for the same inputs — the
    harness's run keys include it, so ``--resume`` reruns that initialiser's runs and no other.
    """

    def deco(fn: Initializer) -> Initializer:
        fn.options_of = options_of
        fn.fixed_options = tuple(fixed)
        fn.version = int(version)
        return _insert(INITIALIZERS, "initializer", name, fn)

    return deco


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: add a model factory to :data:`MODELS` under ``name`` (warns on overwrite).

    Examples:
        >>> @register_model("my-cnn")
        ... class MyCNN(SimpleCNN): ...
    """

    def deco(factory: ModelFactory) -> ModelFactory:
        return _insert(MODELS, "model", name, factory)

    return deco


def get(name: str) -> Initializer:
    """The initialiser registered as ``name``; a ``KeyError`` lists the known names."""
    return _lookup(INITIALIZERS, "initializer", name)


def get_model(name: str) -> ModelFactory:
    """The model factory registered as ``name``; a ``KeyError`` lists the known names."""
    return _lookup(MODELS, "model", name)


def _insert(table: dict[str, Any], kind: str, name: str, entry):
    """``table[name] = entry``, warning (at the registering line) when it replaces one."""
    if name in table:
        warnings.warn(f"{kind} {name!r} is registered again; replacing it", stacklevel=3)
    table[name] = entry
    return entry


def _lookup(table: dict[str, Any], kind: str, name: str):
    """``table[name]``; a ``KeyError`` naming the ``kind`` and listing the known names."""
    try:
        return table[name]
    except KeyError:
        raise KeyError(f"unknown {kind} {name!r}; known: {sorted(table)}") from None


_NOT_OPTIONS = {"model", "module", "images", "data", "generator", "raw_images"}


def _keywords(fn: Callable) -> tuple[set[str], bool]:
    """(keywords of ``fn`` that have defaults, whether it takes ``**kwargs``)."""
    params = inspect.signature(fn).parameters.values()
    names = {p.name for p in params
             if p.default is not p.empty and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def accepted_options(name: str) -> set[str] | None:
    """The option keywords initialiser ``name`` accepts (its own and its ``options_of``'s, minus
    the data, the generator and its fixed ones); ``None`` when it takes ``**options`` it does not
    declare (they are then checked only when it runs)."""
    fn = get(name)
    names, open_ended = _keywords(fn)
    declared = getattr(fn, "options_of", None)
    if declared is not None:
        for item in ([declared] if callable(declared) else declared):
            names |= {item} if isinstance(item, str) else _keywords(item)[0]
    elif open_ended:
        return None
    return names - _NOT_OPTIONS - set(getattr(fn, "fixed_options", ()))


def check_options(name: str, options: dict[str, Any]) -> None:
    """Refuse option keys initialiser ``name`` does not accept (a ``ValueError`` naming the key,
    the close matches and every accepted key): a typo is found before any run trains."""
    accepted = accepted_options(name)
    if accepted is None:
        return
    unknown = sorted(set(options) - accepted)
    if unknown:
        hints = {k: difflib.get_close_matches(k, accepted, n=1) for k in unknown}
        said = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "")
                         for k, h in hints.items())
        raise ValueError(f"--init-option: {name} has no option {said}; it accepts: "
                         f"{', '.join(sorted(accepted)) or 'none'}")


def split_data(data) -> tuple[Any, Any]:
    """``(images, raw)`` of an initialiser's ``data``: a tensor is the standardised batch (no raw
    pixels), a dict gives its ``images`` and ``raw``; ``None`` gives ``(None, None)``."""
    if data is None:
        return None, None
    if isinstance(data, dict):
        return data.get("images"), data.get("raw")
    return data, None
