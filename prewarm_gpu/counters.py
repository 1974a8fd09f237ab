"""Count what makes GPU code slow, on any device: ATen ops dispatched and host syncs.

On a GPU a small problem costs what it launches and how often the host waits for the device, not
its arithmetic. Both can be counted on the CPU, where CI runs: every ATen op a call dispatches (a
proxy for kernel launches) and every op that would make the host wait for a CUDA device (reading a
value, a data-dependent output shape, a device-to-host copy). Tests hold the counts; a GPU run
measures the time (``benchmarks/gpu_suite.py``).

Example:
    >>> with count_dispatch() as c:
    ...     MiniBatchKMeans(16, loop="device").fit(X)
    >>> c.n_ops, c.n_syncs
"""

from __future__ import annotations

import collections
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["count_dispatch", "DispatchCount"]

# Ops whose result the host must wait for on CUDA: a value read on the host, or an output whose
# shape depends on the data.
_SYNC_OPS = {
    "aten._local_scalar_dense",  # .item(), float(t), int(t), bool(t), if t: ...
    "aten.is_nonzero",
    "aten.equal",
    "aten.nonzero",
    "aten.masked_select",
    "aten.unique",
    "aten._unique",
    "aten._unique2",
    "aten.unique_consecutive",
    "aten.unique_dim",
    "aten.bincount",  # CUDA reads the largest label to size the output
    "aten.histc",
    "aten.repeat_interleave",
}
# Python-level reads that dispatch nothing on a CPU tensor but copy to the host on CUDA.
_PY_READS = ("tolist", "numpy", "cpu")


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class DispatchCount(TorchDispatchMode):
    """A dispatch mode recording every ATen op and every host sync (see :func:`count_dispatch`)."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.syncs: collections.Counter[str] = collections.Counter()

    @property
    def n_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def n_syncs(self) -> int:
        return sum(self.syncs.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        self.ops[name] += 1
        if name in _SYNC_OPS:
            if not (name == "aten.repeat_interleave" and kwargs.get("output_size") is not None):
                self.syncs[name] += 1
        elif name in ("aten.index", "aten.index_put", "aten.index_put_") and _has_bool_index(args):
            self.syncs[name + "[bool mask]"] += 1
        elif name in ("aten._to_copy", "aten.copy_"):
            src = args[1] if name == "aten.copy_" else args[0]
            dst = args[0].device if name == "aten.copy_" else kwargs.get("device")
            if (dst is not None and torch.device(dst).type == "cpu"
                    and isinstance(src, torch.Tensor) and src.device.type != "cpu"):
                self.syncs["device-to-host copy"] += 1
        return func(*args, **kwargs)


@contextmanager
def count_dispatch():
    """Count ATen ops and host syncs inside the block; yields a :class:`DispatchCount`.

    Host syncs are the ops in ``_SYNC_OPS``, boolean-mask indexing, device-to-host copies, and the
    Python-level ``Tensor.tolist``/``numpy``/``cpu`` (which dispatch nothing on a CPU tensor).

    To see those three, the block patches ``torch.Tensor``: for its duration, and only then,
    ``torch.Tensor.tolist``/``numpy``/``cpu`` are wrappers that count each call and then call the
    original. The patch is process-wide (every thread's calls are counted while the block runs)
    and is undone on exit, exceptions included: the class's own dictionary is left exactly as it
    was (a name that was inherited is deleted again, not shadowed by a copy of the original).
    Nothing outside this context manager touches ``torch.Tensor``; importing this module patches
    nothing. A development tool (the tests and the GPU suite's ``gpu_suite_parts/measure.py``
    use it), never called by the library itself.
    """
    mode = DispatchCount()
    own = torch.Tensor.__dict__
    saved = {name: own.get(name) for name in _PY_READS}  # None: inherited, not set on Tensor
    originals = {name: getattr(torch.Tensor, name) for name in _PY_READS}

    def recording(name, fn):
        def wrapper(self, *args, **kwargs):
            mode.syncs[f"Tensor.{name}"] += 1
            return fn(self, *args, **kwargs)
        return wrapper

    try:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, recording(name, fn))
        with mode:
            yield mode
    finally:
        for name, value in saved.items():
            if value is None:
                if name in torch.Tensor.__dict__:
                    delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, value)
