"""MiniBatchKMeans's pure functions run as CUDA graphs: captured once per sizes, cached, replayed.

``graphs="auto"`` on CUDA (or ``True``): :func:`~prewarm_gpu.kmeans_ops._kmeans_plusplus_rounds`
and :func:`~prewarm_gpu.kmeans_loop._chunk`, each captured once per (constants, shapes, dtypes,
device), kept in a small module-level cache and replayed, with the inputs copied into its static
buffers first; the draws, the gather, the validation inertia of the candidates, ``tol``'s variance
and the final labels run eagerly around them. A capture that fails falls back to eager for the rest
of the fit with one warning naming the cause; the eager path is the same functions, so the bits are
the same. On the CPU (``"auto"``) everything is eager; ``graphs=True`` there is refused. Not yet
measured on a GPU.
"""

from __future__ import annotations

import collections
import warnings

import torch
from torch.utils._pytree import tree_leaves, tree_map

_GRAPHS: collections.OrderedDict = collections.OrderedDict()  # full key → capture, or its error
_GRAPHS_MAX = 32  # captures kept (least recently used dropped): a fit uses at most 4
_WARMUP = 2  # eager runs on a side stream before capture (cuBLAS handles, allocator pools)


def _resolve_graphs(graphs: bool | str, device: torch.device) -> bool:
    """``"auto"``: CUDA graphs on CUDA; ``True`` elsewhere is refused (it cannot be honoured)."""
    if graphs == "auto":
        return device.type == "cuda"
    if graphs and device.type != "cuda":
        raise ValueError(f"graphs=True needs X on a CUDA device (CUDA graphs), got X on "
                         f"{device}; pass graphs='auto' or graphs=False")
    return bool(graphs)


def _capture(fn, args: tuple):
    """Capture ``fn(*args)`` as a CUDA graph over static copies of args' tensors.

    PyTorch's recipe (``torch/cuda/graphs.py``, CUDA-graph notes): a few eager runs on a side
    stream, then capture; the graph reads and writes fixed addresses, so later calls ``copy_``
    their inputs into ``static_in`` and read ``static_out`` after ``replay()``.

    Returns:
        ``(static_in, static_out, replay)``.
    """
    static_in = tree_map(torch.Tensor.clone, args)
    dev = tree_leaves(args)[0].device
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(_WARMUP):
            fn(*static_in)
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(*static_in)
    return static_in, static_out, graph.replay


class _Runner:
    """Runs a fit's pure functions: eagerly, or (``graphs``) each as a cached CUDA graph.

    A graph is captured once per (key, shapes, dtypes, devices) and kept in ``_GRAPHS``; the key
    holds every constant the function depends on, so a later fit of the same sizes replays it.
    A failed capture is remembered, and the fit goes on eagerly after one warning naming the
    cause (the eager path is the same function, so the results are the same). Graphs share
    static buffers: concurrent fits of the same sizes in threads must not use them.
    """

    def __init__(self, graphs: bool):
        self.graphs = graphs

    def __call__(self, key: tuple, fn, args: tuple):
        if not self.graphs:
            return fn(*args)
        leaves = tree_leaves(args)
        full = (key, tuple((tuple(t.shape), t.dtype, t.device) for t in leaves))
        entry = _GRAPHS.get(full)
        if entry is None:
            try:
                entry = _capture(fn, args)
            except Exception as e:  # noqa: BLE001 -- any failure: the eager path still holds
                entry = f"{type(e).__name__}: {e}"
            _GRAPHS[full] = entry
            while len(_GRAPHS) > _GRAPHS_MAX:
                _GRAPHS.popitem(last=False)
        _GRAPHS.move_to_end(full)
        if isinstance(entry, str):
            self.graphs = False
            name = getattr(fn, "func", fn).__name__
            warnings.warn(f"MiniBatchKMeans: CUDA graph capture of {name} failed ({entry}); "
                          f"this fit runs eagerly (the same results, without graphs)",
                          RuntimeWarning, stacklevel=4)
            return fn(*args)
        static_in, static_out, replay = entry
        for dst, src in zip(tree_leaves(static_in), leaves, strict=True):
            if dst is not src:
                dst.copy_(src)
        replay()
        return static_out


