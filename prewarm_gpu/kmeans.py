"""scikit-learn's MiniBatchKMeans, in a few batched torch ops per step on the data's device.

The algorithm is scikit-learn's (``sklearn/cluster/_kmeans.py``, ``MiniBatchKMeans.fit``): a
validation subsample; ``n_init`` greedy k-means++ candidates, each on its own init subsample, scored
by inertia on the validation subsample (here the candidates are computed *together*, as one batched
problem); one mini-batch loop from the best candidate with count-weighted centre updates, random
reassignment of starved centres and early stopping on an exponentially weighted average of the batch
inertia. The random stream is torch's, so runs agree with scikit-learn in distribution, not draw for
draw; given the same initial centres and batches the centres agree to float rounding.

How the loop avoids the host (the GPU's cost at these sizes is launches and syncs, not arithmetic):

- **One step function** (:func:`_step`) for every path: labels by ``argmin_j ‖c_j‖² - 2 x·c_j``
  (scikit-learn's expression) in float64, so it is exact enough for the batch inertia too and never
  TF32; per-centre sums and counts accumulated into running sums ``T_j = [w_j c_j, w_j]``, so the
  update ``c_j ← (w_j c_j + Σx)/(w_j + m_j)`` is one add and one divide; reassignment of starved
  centres decided with masks.
- **Scale-free**: the fit runs on X divided by a power of two (exact) that brings ``max |X|``
  into [1, 2), and the scores have no constant term, so a fit of ``2^j X`` gives ``2^j`` times the
  centres and the same labels bit for bit, and any scale from float64's smallest to its largest
  values fits (float32's likewise).
- **One stopping rule** (:func:`_stop_rule`): scikit-learn's ``_mini_batch_convergence`` (EWA of the
  batch inertia, ``max_no_improvement``, ``tol``), vectorised over a chunk of steps' inertias.
- **Chunks**: batch indices for ``sync_every`` steps are drawn at once from the generator on the
  device; the steps run without looking at the host; then the rule finds the first step at which
  scikit-learn would have stopped, and the host reads that one integer (the chunk's only sync).
  Steps after the stop were computed but are discarded: the state at the stop step is taken from the
  chunk's history. ``loop="host"`` is the same code with the host looking after every step (no
  wasted steps; on the CPU a look is free).
- **Pure functions**: a chunk (:func:`_chunk`: state and the chunk's gathered batches in; state,
  each step's running sums and the stop index out) and k-means++'s rounds
  (:func:`_kmeans_plusplus_rounds`, given its drawn first centres and uniforms) are functions of
  tensors with no host read, no branch on a value and no data-dependent shape; the random draws,
  the gather of the batch rows and the host's one read per chunk stay outside them. TorchDynamo
  traces both whole (``tests/test_kmeans_graphs.py``).

What runs as a CUDA graph (``graphs="auto"`` on CUDA, or ``True``): those two functions, each
captured once per (constants, shapes, dtypes, device), kept in a small module-level cache and
replayed, with the inputs copied into its static buffers first; the draws, the gather, the
validation inertia of the candidates, ``tol``'s variance and the final labels run eagerly around
them. A capture that fails falls back to eager for the rest of the fit with one warning naming
the cause; the eager path is the same functions, so the bits are the same. On the CPU
(``"auto"``) everything is eager; ``graphs=True`` there is refused. Not yet measured on a GPU.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import warnings

import numpy as np
import torch
from torch.utils._pytree import tree_leaves, tree_map

from ._random import as_generator
from .checks import all_finite, is_int, is_real

__all__ = ["MiniBatchKMeans"]

_CHUNK = 1 << 22  # elements of a label block (rows · (k + d + 1)); bounds temporary memory
_LOOPS = ("auto", "host", "device")
_F64 = torch.float64


@contextlib.contextmanager
def no_autocast():
    """Autocast off on every device type inside: the float64/float32 arithmetic promised here
    must not be lowered to bf16/fp16 by a caller's ``torch.autocast``."""
    with contextlib.ExitStack() as stack:
        for dev in ("cpu", "cuda"):
            if torch.is_autocast_enabled(dev):
                stack.enter_context(torch.autocast(dev, enabled=False))
        yield


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return _F64 if dtype == _F64 else torch.float32


def _resolve_loop(loop: str) -> str:
    """``"auto"`` is the device loop on every device. On the 2-core CPU it measured faster than
    the host loop too (colour batch 19.4 vs 22.9 ms, grey 17.1 vs 28.9 ms,
    ``benchmarks/results/cpu-2core-dev.json``): a look costs nothing there, but evaluating the
    stopping rule after every step costs more than the ~8 steps a chunk wastes after the stop."""
    return "device" if loop == "auto" else loop


# --------------------------------------------------------------------------- distances
def _scores(c: torch.Tensor, xt: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """``‖c‖² - 2 x·c`` between centres c (k, d) and points given transposed, xt (d, b), with
    ``sq = ‖c‖²`` (k, 1): (k, b).

    No constant term: ``‖x‖² + score = ‖x - c‖²`` exactly in real arithmetic, and every term
    scales by s² when the data do, so the argmin is the same at every scale (a constant, as the
    1·1 of ``[x, 1]·[c, 1]`` rows once added, swamps scores below its rounding, ~1e-16).
    """
    return torch.addmm(sq, c, xt, alpha=-2.0)


def _pow2_scale(X: torch.Tensor, init: torch.Tensor | None) -> torch.Tensor:
    """The power of two ``2^(e-1)``, e = ``frexp(max |X|)``'s exponent (also over ``init``): a
    0-d tensor in X's dtype on X's device (no host read).

    Dividing by it is exact (a power of two; only values that fall below the dtype's subnormals
    lose bits), brings ``max |X|`` into [1, 2), and keeps every square and product of the fit
    inside the dtype's range whatever the data's scale. The exponent is clamped to what X's dtype
    can hold, so the scale itself is always finite and nonzero.
    """
    lo, hi = torch.aminmax(X)  # no (n, d) temporary, unlike X.abs()
    m = torch.maximum(-lo, hi).to(_F64)
    if init is not None:
        m = torch.maximum(m, init.abs().amax().to(_F64))
    fi = torch.finfo(X.dtype)
    e = torch.frexp(m).exponent - 1
    tiny = round(math.log2(fi.smallest_normal)) + round(math.log2(fi.eps))  # least subnormal
    e = e.clamp(min=tiny, max=math.frexp(fi.max)[1] - 1)
    return torch.ldexp(torch.ones((), dtype=X.dtype, device=X.device), e)


def _augment(x: torch.Tensor) -> torch.Tensor:
    """Rows ``[x, 1]`` in float64: (..., n, d) → (..., n, d + 1); the 1 is a count, for the
    running sums ``[Σx, m]`` (it never enters a score)."""
    out = x.new_ones(*x.shape[:-1], x.shape[-1] + 1, dtype=_F64)
    out[..., :-1] = x
    return out


def _blocks(X: torch.Tensor):
    """Row blocks of X of at most ``_CHUNK`` elements: whole-X temporaries stay bounded."""
    return X.split(max(1, _CHUNK // max(1, X.shape[-1])), dim=-2)


def _row_sq(X: torch.Tensor) -> torch.Tensor:
    """``‖x‖²`` of every row of X (n, d) in float64, block by block (no (n, d) temporary)."""
    return torch.cat([b.to(_F64).square().sum(-1) for b in _blocks(X)])


def _mean_variance(X: torch.Tensor) -> torch.Tensor:
    """Mean over features of X's per-feature population variance, in float64, block by block
    (scikit-learn's ``np.mean(np.var(X, axis=0))``, the scale of ``tol``)."""
    mean = sum(b.to(_F64).sum(0) for b in _blocks(X)) / X.shape[0]
    ss = sum((b.to(_F64) - mean).square().sum(0) for b in _blocks(X))
    return (ss / X.shape[0]).mean()


def _labels_inertia(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels of the rows of x (..., n, d) among centres c (..., k, d), and the inertia
    ``Σ ‖x - c_label‖²`` (per leading index).

    In float64 by the expansion (its cancellation costs a few of float64's 16 digits, not float32's
    7), in row blocks of bounded size. The inertia is a float64 tensor: reading it is the sync.
    """
    n, d = x.shape[-2:]
    k = c.shape[-2]
    ct = c.to(_F64).transpose(-1, -2)
    c_sq = (ct * ct).sum(-2, keepdim=True)
    rows = max(1, _CHUNK // (k + d + 1))
    labels, inertia = [], 0.0
    for s in range(0, n, rows):
        xb = x[..., s : s + rows, :].to(_F64)
        mins, lab = torch.baddbmm(c_sq, xb, ct, alpha=-2.0).min(-1) if x.ndim == 3 else \
            torch.addmm(c_sq, xb, ct, alpha=-2.0).min(-1)  # (n, k) scores ‖c‖² - 2 x·c
        labels.append(lab)
        inertia = inertia + (mins.sum(-1) + (xb * xb).sum((-1, -2)))
    if not labels:
        return x.new_zeros(0, dtype=torch.long), x.new_zeros((), dtype=_F64)
    return torch.cat(labels, -1), inertia.clamp(min=0)


def _kmeans_plusplus(xs: torch.Tensor, k: int, g: torch.Generator,
                     runner: _Runner | None = None) -> torch.Tensor:
    """Greedy k-means++ on R subsamples at once: xs (R, m, d) → centres (R, k, d), float64.

    scikit-learn's ``_kmeans_plusplus``: first centre uniform; each next centre is the best of
    ``2 + int(ln k)`` candidates drawn ∝ D², the one that lowers the total potential most. Points
    are addressed by flat indices into the (R·m, d) stack, and every uniform draw is made up front.
    Distances by the float64 expansion in one product: ``[c, ‖c‖², 1] · [-2x, 1, ‖x‖²]``.
    The draws are made here; the rounds are :func:`_kmeans_plusplus_rounds`, a pure function.
    """
    R, m, _ = xs.shape
    trials = 2 + int(math.log(k))
    first = torch.randint(0, m, (R, 1), generator=g, device=xs.device)  # (R, 1)
    u = torch.rand(k - 1, R, trials, generator=g, device=xs.device, dtype=_F64)
    if runner is None:
        return _kmeans_plusplus_rounds(xs, first, u)
    return runner(("k-means++",), _kmeans_plusplus_rounds, (xs, first, u))


def _kmeans_plusplus_rounds(xs: torch.Tensor, first: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """k-means++'s k-1 greedy rounds given its draws: a pure function of tensors (capturable).

    Args:
        xs: (R, m, d) subsamples.
        first: (R, 1) the first centre's row in each subsample, uniform in [0, m).
        u: (k-1, R, t) float64 uniforms in [0, 1), t candidates per round.

    Returns:
        (R, k, d) float64 centres. A fixed Python loop over shapes: no host read, no branch on a
        value, no data-dependent shape.
    """
    R, m, d = xs.shape
    k = u.shape[0] + 1
    dev = xs.device
    xs = xs.to(_F64)
    x_sq = (xs * xs).sum(-1, keepdim=True)  # (R, m, 1)
    ones = torch.ones_like(x_sq)
    rows = torch.cat([xs, x_sq, ones], -1).view(R * m, d + 2)  # a point as a centre
    cols = torch.cat([-2 * xs, ones, x_sq], -1).transpose(1, 2).contiguous()  # (R, d+2, m)
    offset = torch.arange(R, device=dev).unsqueeze(1) * m  # flat index of each subsample's row 0
    first = first + offset  # (R, 1) flat
    u = u.unbind(0)

    def dists(idx):  # (R, t) flat indices → (R, t, m) squared distances to every point
        pts = rows.index_select(0, idx.view(-1)).view(R, -1, d + 2)
        return torch.bmm(pts, cols).clamp_(min=0)

    if k == 1:  # no greedy rounds: the uniform first centre is the whole initialisation
        return rows.index_select(0, first.view(-1)).view(R, 1, d + 2)[..., :d]
    closest = dists(first)  # (R, 1, m): D² so far
    pot = closest.sum(-1)  # (R, 1)
    cands, bests = [], []
    for j in range(k - 1):
        cand = torch.searchsorted(closest.view(R, m).cumsum(1), u[j] * pot)
        cand = cand.clamp_(max=m - 1).add_(offset)  # (R, t)
        d_cand = torch.minimum(dists(cand), closest)  # (R, t, m)
        pot, best = d_cand.sum(-1).min(1, keepdim=True)  # first on ties
        closest = d_cand.gather(1, best.unsqueeze(-1).expand(R, 1, m))
        cands.append(cand)
        bests.append(best)
    picks = torch.stack(cands, 1).gather(2, torch.stack(bests, 1)).view(R, k - 1)
    picks = torch.cat([first, picks], 1).view(-1)
    return rows.index_select(0, picks).view(R, k, d + 2)[..., :d]


# --------------------------------------------------------------------------- the loop
def _draw_batches(n: int, steps: int, batch: int, g: torch.Generator,
                  device: torch.device) -> torch.Tensor:
    """Batch indices for ``steps`` steps at once: (steps, batch), uniform with replacement."""
    return torch.randint(0, n, (steps, batch), generator=g, device=device)


def _accumulate(T: torch.Tensor, labels: torch.Tensor, x1: torch.Tensor,
                p: _LoopParams) -> torch.Tensor:
    """``T + [Σx, m]`` per centre: T (k, d+1), labels (b,), x1 (b, d+1) → (k, d+1).

    ``index_add`` on the CPU, where it is deterministic; elsewhere a one-hot product, because CUDA's
    ``index_add`` adds with atomics whose order (and so rounding) changes from run to run.
    """
    if p.arange_k is None:
        return T.index_add(0, labels, x1)
    return torch.addmm(T, (p.arange_k == labels).to(T.dtype), x1)


def _step(T, c, c_sq, x1, xt, cand, p: _LoopParams, check=None):
    """One mini-batch step (scikit-learn's ``_mini_batch_step``), with no host sync.

    Args:
        T: running sums ``[w_j c_j, w_j]`` (k, d+1), float64; ``c = T[:, :d] / w`` the centres
            (k, d) and ``c_sq`` (k, 1) their squared norms.
        x1, xt: the batch as ``[x, 1]`` rows (b, d+1), and the transpose of its points (d, b).
        cand: ``x1[:k]``, the rows that reassigned centres move to (centre j to row j), or None
            when k exceeds the batch: then the r-th reassigned centre moves to row r.
        check: whether reassignment is checked at this step (a bool tensor), or None for always.

    Returns:
        ``(T, c, c_sq, mins)``: the new state, and ``‖c_label‖² - 2 x·c_label`` per row (the
        batch inertia is ``mins.sum() + Σ‖x‖²``).

    The update ``c_j ← (w_j c_j + Σx)/(w_j + m_j)`` is ``T_j += [Σx, m_j]; c_j = T_j / w_j``. A
    centre's count starts at ε = 2⁻⁶⁰ rather than 0 (so ``T / w`` is its initial centre until its
    first update, and that update is the batch mean to float64 rounding). Reassignment: centres with
    ``w < ratio · max(w)`` (at most half a batch, the lightest) jump to batch rows, one each,
    with ``w`` reset to the smallest remaining count. The batch is drawn i.i.d., so any fixed
    distinct rows are distinct batch points chosen uniformly, as scikit-learn's ``choice(b, r,
    replace=False)``: row j for centre j while k ≤ batch, and row r for the r-th moved centre
    (r < batch/2) when k is larger.
    """
    mins, labels = _scores(c, xt, c_sq).min(0)
    T = _accumulate(T, labels, x1, p)
    if p.ratio > 0:
        w = T[:, -1:]
        low = w < w.amax() * p.ratio
        if p.rank_limit:
            low = low & (w.argsort(dim=0, stable=True).argsort(dim=0) < p.max_reassign)
        if check is not None:
            low = low & check
        floor = w.masked_fill(low, math.inf).amin()
        if cand is None:  # k > batch: rank among the moved centres, < max_reassign ≤ batch/2
            cand = x1.index_select(0, (low.view(-1).cumsum(0) - 1).clamp_(min=0))
        T = torch.where(low, cand * floor, T)
    sums, w = T.split([T.shape[1] - 1, 1], 1)  # one op for both views
    c = sums / w
    return T, c, (c * c).sum(1, keepdim=True), mins


class _LoopParams:
    """The loop's constants, derived once per fit."""

    def __init__(self, km: MiniBatchKMeans, n: int, k: int, batch: int, tol: float):
        self.k = k
        self.batch = batch
        self.alpha = min(2.0 * batch / (n + 1), 1.0)
        self.ratio = float(km.reassignment_ratio)
        self.max_reassign = int(0.5 * batch)
        self.rank_limit = k > self.max_reassign
        self.always_check = batch >= 10 * k  # every step has seen 10·k samples since the last check
        self.patience = km.max_no_improvement
        self.tol = tol
        self.arange_k = None  # (k, 1) on the data's device: sums by one-hot product (not CPU)

    def key(self) -> tuple:
        """Everything here that a chunk's computation depends on, for the graph cache."""
        return (self.k, self.batch, self.alpha, self.ratio, self.max_reassign, self.rank_limit,
                self.always_check, self.patience, self.tol, self.arange_k is not None)


def _chunk(state: tuple, x1: torch.Tensor, x_sq: torch.Tensor, *, weights, p: _LoopParams,
           skip: int, first: bool):
    """One chunk of the loop, a pure function of tensors: L steps, then the stopping rule.

    Args:
        state: ``(T, c, c_sq, since, carry)``: the running sums (k, d+1), the centres (k, d),
            their squared norms (k, 1), the samples seen since reassignment was last checked
            (0-d long) and :func:`_stop_rule`'s carry.
        x1: (L, b, d+1) the chunk's batches as ``[x, 1]`` rows, gathered outside (the draws are
            the caller's).
        x_sq: (L,) ``Σ‖x‖²`` of each batch.
        weights: :func:`_ewa_weights` for ``L - skip`` steps (None when ``L <= skip``).
        p: the loop's constants (``p.arange_k`` chooses the one-hot sums, see :func:`_accumulate`).
        skip: 1 when the chunk starts with the fit's first step, whose inertia is not judged.
        first: the first judged step is the fit's first counted one (the EWA starts there).

    Returns:
        ``(state, hist, stop_at)``: the state after the L steps; the running sums after each step
        (a tuple of L); and a 0-d long tensor, the first step (counted from ``skip``) at which
        scikit-learn stops, ``L - skip`` if none (None when no step is judged). No host read, no
        branch on a value and no data-dependent shape inside: it traces whole
        (``torch.compile(fullgraph=True)``) and is captured as one CUDA graph.
    """
    d = x1.shape[-1] - 1
    xs = x1.unbind(0)
    cands = x1[:, : p.k].unbind(0) if p.k <= p.batch else (None,) * x1.shape[0]
    xts = x1[..., :d].transpose(1, 2).unbind(0)  # the points, without the count column
    return _chunk_steps(state, xs, xts, cands, x_sq, weights, p, skip, first)


def _chunk_steps(state, xs, xts, cands, x_sq, weights, p, skip, first):
    """:func:`_chunk` given the per-step views of x1 (the host loop makes them once per draw)."""
    T, c, c_sq, since, carry = state
    hist, mins, moved = [], [], []
    for x1, xt, cand in zip(xs, xts, cands, strict=True):
        check = None
        if p.ratio > 0 and not p.always_check:
            since = since + p.batch
            check = (T[:, -1] < 1).any() | (since >= 10 * p.k)
            since = torch.where(check, 0, since)
        old = c
        T, c, c_sq, m = _step(T, c, c_sq, x1, xt, cand, p, check)
        hist.append(T)
        mins.append(m)
        if p.tol > 0:
            moved.append((c - old).square().sum())
    stop_at = None
    if len(xs) > skip:
        b = (torch.stack(mins[skip:]).sum(1) + (x_sq[skip:] if skip else x_sq)) / p.batch
        stop, carry = _stop_rule(b, carry, p, first, weights,
                                 torch.stack(moved[skip:]) if moved else None)
        stop_at = torch.cat([stop, stop.new_ones(1)]).int().argmax()
    return (T, c, c_sq, since, carry), tuple(hist), stop_at


# --------------------------------------------------------------------------- CUDA graphs
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


def _ewa_weights(S: int, alpha: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, L) with ``ewa = P·e₀ + L @ b``: the EWA recurrence ``e_t = (1-α) e_{t-1} + α b_t`` over S
    steps in closed form, ``P_t = (1-α)^(t+1)``, ``L_ts = α (1-α)^(t-s)`` for s ≤ t."""
    t = torch.arange(S, device=device, dtype=_F64)
    lag = t[:, None] - t[None, :]
    L = torch.where(lag >= 0, alpha * (1 - alpha) ** lag.clamp(min=0), 0.0)
    return (1 - alpha) ** (t + 1), L


def _stop_rule(b: torch.Tensor, carry: tuple, p: _LoopParams, first: bool, weights,
               moved: torch.Tensor | None = None):
    """scikit-learn's ``_mini_batch_convergence``, over a chunk of steps at once, on the device.

    Per step (batch inertia ``b_t`` divided by the batch size; the fit's first step is ignored by
    the caller, as scikit-learn ignores it): the first counted step sets ``e = b``; later
    ``e ← (1-α) e + α b``, ``α = min(2·batch/(n+1), 1)``; stop when the centres moved at most
    ``tol`` (if ``tol > 0``), or when ``e`` has not reached a new minimum for
    ``max_no_improvement`` steps in a row.

    Args:
        b: (S,) float64 batch inertias of the chunk's steps.
        carry: ``(e, e_min, last)`` after the previous chunk: the EWA, its minimum (inf at the
            start), and the index of its last new minimum relative to this chunk's start (≤ -1).
        first: the chunk starts with the first counted step (then ``e₀ = b_0`` gives ``e = b_0``).
        weights: :func:`_ewa_weights` for S.
        moved: (S,) squared centre movements, when ``tol > 0``.

    Returns:
        ``(stop, carry)``: (S,) bool, True where scikit-learn stops; the carry for the next chunk.
    """
    S = b.shape[0]
    e0, e_min, last = carry
    if first:
        e0 = b[0]
    P, L = weights
    e = torch.addmv(P * e0, L, b)  # (S,) the EWA after each step
    prev_min = torch.cat([e_min.reshape(1), e]).cummin(0).values  # [t]: the minimum before step t
    t = torch.arange(S, device=b.device)
    last_new = torch.where(e < prev_min[:-1], t, last).cummax(0).values  # last new minimum ≤ t
    stop = torch.zeros(S, dtype=torch.bool, device=b.device)
    if p.patience is not None:
        stop = (t - last_new) >= p.patience
    if p.tol > 0:
        stop = stop | (moved <= p.tol)
    return stop, (e[-1], prev_min[-1], last_new[-1] - S)


class MiniBatchKMeans:
    """Mini-batch k-means (Sculley 2010), scikit-learn's algorithm and defaults, in torch.

    ``Web-Scale K-Means Clustering`` - Sculley (2010); scikit-learn ``MiniBatchKMeans``.

    Each step draws a batch ``B`` uniformly with replacement, labels it against the current centres,
    then for each centre ``j`` with ``m_j > 0`` batch points:

    .. math::
        c_j \\leftarrow \\frac{w_j c_j + \\sum_{x \\in B_j} x}{w_j + m_j},
        \\qquad w_j \\leftarrow w_j + m_j

    Args:
        n_clusters: k.
        init: ``"k-means++"``, or initial centres (k, d) (then ``n_init`` is ignored, as in
            scikit-learn).
        n_init: k-means++ candidates (computed together); the best on a validation subsample wins.
        batch_size: points per step (capped at n).
        max_iter: epochs of budget: at most ``(max_iter · n) // batch_size`` steps.
        init_size: size of each init subsample (default ``3 · batch_size``, capped at n).
        max_no_improvement: stop after this many steps without a new minimum of the smoothed
            inertia (``None`` disables early stopping).
        reassignment_ratio: centres whose count is below this fraction of the largest count are
            moved to random batch points (in [0, 1]).
        tol: stop when the squared centre movement falls to ``tol · mean(var(X))`` (0: off; > 0
            costs one more host sync per fit).
        random_state: ``None``, an ``int`` seed or a ``torch.Generator`` on X's device.
        loop: ``"device"``: the host looks at the stop flag once per ``sync_every`` steps;
            ``"host"``: after every step (the same steps, the same result, no wasted steps);
            ``"auto"``: device (measured faster on the CPU too; see ``_resolve_loop``).
        sync_every: steps per chunk: batch indices are drawn, and on the device loop the host
            looks, once per chunk (default 16).
        graphs: run k-means++ and each chunk as a CUDA graph (captured once per sizes, cached,
            replayed): ``"auto"``: on CUDA; ``True``: required (refused off CUDA); ``False``:
            eager. The results are the same bits either way; a failed capture falls back to
            eager with a warning.

    Fitted attributes: ``cluster_centers_``, ``labels_``, ``inertia_`` (a float; reading it is the
    fit's last host sync), ``n_steps_``, ``n_iter_``, ``init_inertia_``.

    Example:
        >>> km = MiniBatchKMeans(16, random_state=0).fit(torch.randn(5000, 9))
        >>> km.cluster_centers_.shape
        torch.Size([16, 9])
    """

    def __init__(
        self,
        n_clusters: int,
        *,
        init: str | torch.Tensor | np.ndarray = "k-means++",
        n_init: int = 3,
        batch_size: int = 1024,
        max_iter: int = 100,
        init_size: int | None = None,
        max_no_improvement: int | None = 10,
        reassignment_ratio: float = 0.01,
        tol: float = 0.0,
        random_state: int | torch.Generator | None = None,
        loop: str = "auto",
        sync_every: int = 16,
        graphs: bool | str = "auto",
    ):
        self.n_clusters = n_clusters
        self.init = init
        self.n_init = n_init
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.init_size = init_size
        self.max_no_improvement = max_no_improvement
        self.reassignment_ratio = reassignment_ratio
        self.tol = tol
        self.random_state = random_state
        self.loop = loop
        self.sync_every = sync_every
        self.graphs = graphs

    # ------------------------------------------------------------------ validation
    def check_params(self) -> None:
        """Refuse bad constructor arguments (a ``ValueError`` naming the parameter); :meth:`fit`
        calls it, and so does a caller that validates before doing other work."""
        for name in ("n_clusters", "n_init", "batch_size", "max_iter", "sync_every"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        v = self.init_size
        if v is not None and (not is_int(v) or v < 1):
            raise ValueError(f"init_size must be None or a positive int, got {v!r}")
        v = self.max_no_improvement
        if v is not None and (not is_int(v) or v < 0):
            raise ValueError(f"max_no_improvement must be None or an int >= 0, got {v!r}")
        v = self.tol
        if not is_real(v) or v < 0:
            raise ValueError(f"tol must be a finite number >= 0, got {v!r}")
        v = self.reassignment_ratio
        if not is_real(v) or not 0 <= v <= 1:
            raise ValueError(f"reassignment_ratio must be a number in [0, 1], got {v!r}")
        if not (self.graphs == "auto" or isinstance(self.graphs, bool)):
            raise ValueError(f"graphs must be 'auto', True or False, got {self.graphs!r}")
        if self.loop not in _LOOPS:
            raise ValueError(f"loop must be one of {_LOOPS}, got {self.loop!r}")
        if isinstance(self.init, str) and self.init != "k-means++":
            raise ValueError(f"init must be 'k-means++' or an array of centres, got {self.init!r}")

    def _check_X(self, X, name: str = "X") -> torch.Tensor:
        if isinstance(X, np.ndarray):
            X = torch.from_numpy(X)
        if not isinstance(X, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(X).__name__}")
        if X.ndim != 2:
            raise ValueError(f"{name} must be 2-D (n_samples, n_features), got shape "
                             f"{tuple(X.shape)}")
        if X.dtype == torch.uint8:
            X = X.float()
        if not X.is_floating_point():
            raise TypeError(f"{name} must be floating point or uint8, got {X.dtype}")
        X = X.to(_compute_dtype(X.dtype))
        if not all_finite(X):
            raise ValueError(f"{name} contains NaN or Inf")
        return X.contiguous()

    def _check_init(self, X: torch.Tensor) -> torch.Tensor | None:
        if isinstance(self.init, str):
            return None
        c = self._check_X(self.init, "init").to(X.device)
        if c.shape != (self.n_clusters, X.shape[1]):
            raise ValueError(f"init must have shape (n_clusters, n_features) = "
                             f"({self.n_clusters}, {X.shape[1]}), got {tuple(c.shape)}")
        return c

    # ------------------------------------------------------------------ fit
    def fit(self, X) -> MiniBatchKMeans:
        """Cluster the rows of X (n, d) on X's device; returns ``self``."""
        self.check_params()
        X = self._check_X(X)
        if X.shape[0] < self.n_clusters:
            raise ValueError(f"n_samples={X.shape[0]} should be >= n_clusters={self.n_clusters}.")
        if X.shape[1] < 1:
            raise ValueError(f"X has {X.shape[1]} features; at least 1 is required")
        with no_autocast():
            return self.fit_valid(X, self._check_init(X))

    def fit_valid(self, X: torch.Tensor, init: torch.Tensor | None = None, *,
                  overwrite_x: bool = False) -> MiniBatchKMeans:
        """:meth:`fit` without its checks, for a caller that has made X valid: finite, contiguous
        float32/float64 X with n ≥ k rows, valid parameters (:meth:`check_params`), autocast off.

        The fit runs on ``X / 2^e`` (:func:`_pow2_scale`: ``max |X|`` brought into [1, 2)), and
        the centres and the inertia are scaled back; ``overwrite_x=True`` divides X in place
        (no copy of it; X then holds the scaled values) instead of on a copy.
        """
        n, d = X.shape
        k = int(self.n_clusters)
        dev = X.device
        runner = _Runner(_resolve_graphs(self.graphs, dev))
        g = as_generator(self.random_state, dev)
        # An exact power-of-two rescaling (no host read): labels and centres are the same bits
        # at every power-of-two scale of the data, and no square over- or underflows.
        scale = _pow2_scale(X, init)
        X = X.div_(scale) if overwrite_x else X / scale
        if init is not None:
            init = init.to(_F64) / scale.to(_F64)
        batch = min(int(self.batch_size), n)
        init_size = int(self.init_size) if self.init_size is not None else 3 * batch
        if init_size < k:
            init_size = 3 * k
        init_size = min(init_size, n)

        # Initialisation: validation subsample, then n_init k-means++ candidates at once.
        valid = X[torch.randint(0, n, (init_size,), generator=g, device=dev)]
        if init is not None:
            cands = init.to(_F64).unsqueeze(0)
        else:
            if init_size < n:
                sub = torch.randint(0, n, (int(self.n_init), init_size), generator=g, device=dev)
                xs = X[sub]
            else:
                xs = X.unsqueeze(0).expand(int(self.n_init), n, d)
            cands = _kmeans_plusplus(xs, k, g, runner)  # (n_init, k, d)
        cand_inertia = _labels_inertia(valid.expand(cands.shape[0], -1, -1), cands)[1]
        best = cands.index_select(0, cand_inertia.argmin().reshape(1))[0]  # ties: the first

        tol = 0.0
        if self.tol > 0:
            tol = float(_mean_variance(X)) * self.tol
        params = _LoopParams(self, n, k, batch, tol)
        centres, n_steps = self._run(X, best, g, params, runner)

        centres = centres.to(X.dtype)
        self.n_steps_ = n_steps
        self.n_iter_ = int(math.ceil(n_steps * batch / n))
        self.labels_, inertia = _labels_inertia(X, centres)
        self.cluster_centers_ = centres * scale  # exact: a power of two
        s64 = scale.to(_F64)
        # Two products, not one by s², which overflows before the inertia does.
        self.inertia_tensor_ = inertia * s64 * s64
        self._init_inertia = cand_inertia.min() * s64 * s64
        return self

    @property
    def inertia_(self) -> float:
        """Σ ‖x - c_label‖² over the fitted X (float64); ``inertia_tensor_`` is the same value as
        a 0-d tensor on X's device (reading it here is a host sync).

        Where the true value exceeds float64's range (float64 data beyond ~1e150 in magnitude;
        never float32 data) it is ``inf``, with a warning here: the fit itself ran on rescaled
        data, so ``cluster_centers_`` and ``labels_`` are still right. It is never NaN.
        """
        v = float(self.inertia_tensor_)
        if v == math.inf:
            warnings.warn("inertia_ is inf: the sum of squared distances exceeds float64's range "
                          "at this data scale (cluster_centers_ and labels_ are unaffected)",
                          stacklevel=2)
        return v

    @property
    def init_inertia_(self) -> float:
        """Inertia of the chosen initialisation on the validation subsample (``inf`` where it
        exceeds float64's range, as :attr:`inertia_`)."""
        return float(self._init_inertia)

    def _run(self, X: torch.Tensor, centres: torch.Tensor, g: torch.Generator,
             p: _LoopParams, runner: _Runner | None = None) -> tuple[torch.Tensor, int]:
        """The mini-batch loop from ``centres`` (k, d); returns the final centres and the steps.

        Chunks of ``sync_every`` steps: indices drawn at once and the batches gathered, then
        :func:`_chunk` (the steps and the stopping rule, through ``runner``: eager or a CUDA
        graph); the host then reads the first stopping step, once per chunk (device loop) or
        after every step (host loop: :func:`_chunk` over one step at a time).
        """
        n, d = X.shape
        dev = X.device
        runner = runner or _Runner(False)
        budget = (int(self.max_iter) * n) // p.batch
        S = int(self.sync_every)
        look_every = 1 if _resolve_loop(self.loop) == "host" else S
        weights = {}

        c = centres
        T = _augment(c) * 2.0**-60  # counts start at ε: T / w is the initial centre until updated
        c_sq = (c * c).sum(1, keepdim=True)
        if dev.type != "cpu":
            p.arange_k = torch.arange(p.k, device=dev).unsqueeze(1)
        carry = (X.new_zeros((), dtype=_F64), X.new_full((), math.inf, dtype=_F64),
                 torch.full((), -1, device=dev, dtype=torch.long))
        since = torch.zeros((), device=dev, dtype=torch.long)
        state = (T, c, c_sq, since, carry)
        x_sq_all = _row_sq(X)  # ‖x‖² of every row
        buf = X.new_ones(S * p.batch, d + 1, dtype=_F64)  # batches as [x, 1] rows, reused
        start = 0
        while start < budget:
            rows = min(S, budget - start)
            idx = _draw_batches(n, rows, p.batch, g, dev).view(-1)
            x1 = buf[: rows * p.batch]
            x1[:, :d] = X.index_select(0, idx)
            x1 = x1.view(rows, p.batch, d + 1)
            x_sq = x_sq_all.index_select(0, idx).view(rows, p.batch).sum(1)  # Σ‖x‖² per batch
            views = None
            for s0 in range(0, rows, look_every):
                s1 = min(s0 + look_every, rows)
                # The fit's first step is not judged: its inertia measures the initial centres.
                skip = 1 if start + s0 == 0 else 0
                first = start + s0 + skip == 1
                L = s1 - s0 - skip
                if L > 0 and L not in weights:
                    weights[L] = _ewa_weights(L, p.alpha, dev)
                w = weights.get(L)
                if s1 - s0 == rows or runner.graphs:
                    whole = s1 - s0 == rows
                    fn = functools.partial(_chunk, weights=w, p=p, skip=skip, first=first)
                    state, hist, stop_at = runner(
                        ("chunk", p.key(), skip, first), fn,
                        (state, x1 if whole else x1[s0:s1], x_sq if whole else x_sq[s0:s1]))
                else:  # the host loop, eager: the per-step views once per draw, as _chunk's
                    if views is None:
                        views = (x1.unbind(0), x1[..., :d].transpose(1, 2).unbind(0),
                                 x1[:, : p.k].unbind(0) if p.k <= p.batch else (None,) * rows)
                    xs, xts, cands = views
                    state, hist, stop_at = _chunk_steps(
                        state, xs[s0:s1], xts[s0:s1], cands[s0:s1],
                        x_sq[s0:s1] if L > 0 else None, w, p, skip, first)
                if stop_at is not None:
                    j = int(stop_at)  # the one host sync of these steps
                    if j < L:
                        return _centres(hist[skip + j], d), start + s0 + skip + j + 1
            start += rows
        return _centres(state[0], d), budget

    # ------------------------------------------------------------------ predict
    def predict(self, X) -> torch.Tensor:
        """Index of the nearest centre for each row of X."""
        if not hasattr(self, "cluster_centers_"):
            raise RuntimeError("this MiniBatchKMeans is not fitted yet; call fit(X) first")
        X = self._check_X(X).to(self.cluster_centers_.device)
        if X.shape[1] != self.cluster_centers_.shape[1]:
            raise ValueError(
                f"X has {X.shape[1]} features but the model was fitted on "
                f"{self.cluster_centers_.shape[1]}"
            )
        if X.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long, device=X.device)
        with no_autocast():
            scale = _pow2_scale(X, self.cluster_centers_)  # as the fit: no square overflows
            return _labels_inertia(X / scale, self.cluster_centers_.to(_F64) / scale.to(_F64))[0]


def _centres(T: torch.Tensor, d: int) -> torch.Tensor:
    """Centres ``T / w`` as (k, d) float64 from the running sums (k, d+1)."""
    return T[:, :d] / T[:, d:]
