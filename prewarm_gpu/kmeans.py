"""scikit-learn's MiniBatchKMeans, in a few batched torch ops per step on the data's device.

The algorithm is scikit-learn's (``sklearn/cluster/_kmeans.py``, ``MiniBatchKMeans.fit``): a
validation subsample; ``n_init`` greedy k-means++ candidates, each on its own init subsample, scored
by inertia on the validation subsample (here the candidates are computed *together*, as one batched
problem); one mini-batch loop from the best candidate with count-weighted centre updates, random
reassignment of starved centres and early stopping on an exponentially weighted average of the batch
inertia. The random stream is torch's, so runs agree with scikit-learn in distribution, not draw for
draw; given the same initial centres and batches the centres agree to float rounding.

This module is the estimator: its checks, the random draws, and the loop that drives the pure
functions of :mod:`~prewarm_gpu.kmeans_ops` (distances, the exact power-of-two rescaling,
k-means++'s rounds) and :mod:`~prewarm_gpu.kmeans_loop` (the mini-batch step, a chunk of steps,
the stopping rule), eagerly or as CUDA graphs (:mod:`~prewarm_gpu.kmeans_graphs`). The host reads
one integer per chunk of ``sync_every`` steps (``loop="device"``) or after every step
(``loop="host"``: the same code, no wasted steps; on the CPU a look is free).
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch

from ._random import as_generator
from .checks import all_finite, is_int, is_real
from .kmeans_graphs import _resolve_graphs, _Runner
from .kmeans_loop import (
    _centres,
    _chunk,
    _chunk_steps,
    _ewa_weights,
    _initial_state,
    _looks,
    _LoopParams,
    _step_views,
)
from .kmeans_ops import (
    _F64,
    _kmeans_plusplus_rounds,
    _labels_inertia,
    _mean_variance,
    _pow2_scale,
    _row_sq,
    no_autocast,
)

__all__ = ["MiniBatchKMeans"]

_LOOPS = ("auto", "host", "device")


def _resolve_loop(loop: str) -> str:
    """``"auto"`` is the device loop on every device. On the 2-core CPU it measured faster than
    the host loop too (colour batch 19.4 vs 22.9 ms, grey 17.1 vs 28.9 ms,
    ``benchmarks/results/cpu-2core-dev.json``): a look costs nothing there, but evaluating the
    stopping rule after every step costs more than the ~8 steps a chunk wastes after the stop."""
    return "device" if loop == "auto" else loop


# --------------------------------------------------------------------------- the random draws
def _kmeans_plusplus(xs: torch.Tensor, k: int, g: torch.Generator,
                     runner: _Runner | None = None) -> torch.Tensor:
    """Greedy k-means++ on R subsamples at once: xs (R, m, d) → centres (R, k, d), float64.

    The draws (the first centre uniform; every uniform up front) are made here; the rounds are
    :func:`~prewarm_gpu.kmeans_ops._kmeans_plusplus_rounds`, a pure function, run by ``runner``.
    """
    R, m, _ = xs.shape
    trials = 2 + int(math.log(k))
    first = torch.randint(0, m, (R, 1), generator=g, device=xs.device)  # (R, 1)
    u = torch.rand(k - 1, R, trials, generator=g, device=xs.device, dtype=_F64)
    if runner is None:
        return _kmeans_plusplus_rounds(xs, first, u)
    return runner(("k-means++",), _kmeans_plusplus_rounds, (xs, first, u))


def _draw_batches(n: int, steps: int, batch: int, g: torch.Generator,
                  device: torch.device) -> torch.Tensor:
    """Batch indices for ``steps`` steps at once: (steps, batch), uniform with replacement."""
    return torch.randint(0, n, (steps, batch), generator=g, device=device)


def _draw_chunk(X: torch.Tensor, x_sq: torch.Tensor, buf: torch.Tensor, steps: int, batch: int,
                g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's batches, drawn at once: ``(x1, Σ‖x‖²)``, the rows as ``[x, 1]`` (steps, batch,
    d+1) gathered into ``buf`` (reused from chunk to chunk), and each batch's ``Σ‖x‖²`` (steps,)
    from ``x_sq``, every row's ``‖x‖²``."""
    n, d = X.shape
    idx = _draw_batches(n, steps, batch, g, X.device).view(-1)
    x1 = buf[: steps * batch]
    x1[:, :d] = X.index_select(0, idx)
    return x1.view(steps, batch, d + 1), x_sq.index_select(0, idx).view(steps, batch).sum(1)


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
        X = X.to(_F64 if X.dtype == _F64 else torch.float32)  # the compute dtype
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
        n = X.shape[0]
        k = int(self.n_clusters)
        dev = X.device
        runner = _Runner(_resolve_graphs(self.graphs, dev))
        g = as_generator(self.random_state, dev)
        # An exact power-of-two rescaling (no host read): labels and centres are the same bits
        # at every power-of-two scale of the data, and no square over- or underflows.
        scale = _pow2_scale(X, init)
        X = X.div_(scale) if overwrite_x else X / scale
        batch = min(int(self.batch_size), n)
        init_size = self._init_size(n, batch)

        # Initialisation: validation subsample, then n_init k-means++ candidates at once.
        valid = X[torch.randint(0, n, (init_size,), generator=g, device=dev)]
        if init is not None:
            cands = (init.to(_F64) / scale.to(_F64)).unsqueeze(0)
        else:
            cands = _kmeans_plusplus(self._init_subsamples(X, init_size, g), k, g, runner)
        cand_inertia = _labels_inertia(valid.expand(cands.shape[0], -1, -1), cands)[1]
        best = cands.index_select(0, cand_inertia.argmin().reshape(1))[0]  # ties: the first

        tol = float(_mean_variance(X)) * self.tol if self.tol > 0 else 0.0
        centres, n_steps = self._run(X, best, g, _LoopParams(self, n, k, batch, tol), runner)
        self._set_fitted(X, centres.to(X.dtype), n_steps, batch, scale, cand_inertia.min())
        return self

    def _init_size(self, n: int, batch: int) -> int:
        """Rows of each init subsample (scikit-learn's rule): ``init_size``, by default
        ``3 · batch``; ``3 · k`` where that is below k; at most n."""
        k = int(self.n_clusters)
        size = int(self.init_size) if self.init_size is not None else 3 * batch
        if size < k:
            size = 3 * k
        return min(size, n)

    def _init_subsamples(self, X: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
        """k-means++'s ``n_init`` subsamples of ``size`` rows: (n_init, size, d); all of X (not
        drawn) when ``size`` is n."""
        n, d = X.shape
        if size < n:
            return X[torch.randint(0, n, (int(self.n_init), size), generator=g, device=X.device)]
        return X.unsqueeze(0).expand(int(self.n_init), n, d)

    def _set_fitted(self, X: torch.Tensor, centres: torch.Tensor, n_steps: int, batch: int,
                    scale: torch.Tensor, init_inertia: torch.Tensor) -> None:
        """The fitted attributes, from a fit on ``X / scale`` scaled back (exactly: a power of
        two)."""
        self.n_steps_ = n_steps
        self.n_iter_ = int(math.ceil(n_steps * batch / X.shape[0]))
        self.labels_, inertia = _labels_inertia(X, centres)
        self.cluster_centers_ = centres * scale  # exact: a power of two
        s64 = scale.to(_F64)
        # Two products, not one by s², which overflows before the inertia does.
        self.inertia_tensor_ = inertia * s64 * s64
        self._init_inertia = init_inertia * s64 * s64

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
             p: _LoopParams, runner: _Runner) -> tuple[torch.Tensor, int]:
        """The mini-batch loop from ``centres`` (k, d); returns the final centres and the steps.

        Chunks of ``sync_every`` steps: indices drawn at once and the batches gathered, then
        :func:`_chunk` (the steps and the stopping rule, through ``runner``: eager or a CUDA
        graph); the host then reads the first stopping step, once per chunk (device loop) or
        after every step (host loop: :func:`_chunk` over one step at a time).
        """
        n, d = X.shape
        dev = X.device
        budget = (int(self.max_iter) * n) // p.batch
        S = int(self.sync_every)
        look_every = 1 if _resolve_loop(self.loop) == "host" else S
        weights = {}  # _ewa_weights per number of judged steps
        if dev.type != "cpu":
            p.arange_k = torch.arange(p.k, device=dev).unsqueeze(1)
        state = _initial_state(centres)
        x_sq_all = _row_sq(X)  # ‖x‖² of every row
        buf = X.new_ones(S * p.batch, d + 1, dtype=_F64)  # batches as [x, 1] rows, reused
        for start, rows, s0, s1 in _looks(budget, S, look_every):
            if s0 == 0:  # a new chunk: its batches drawn at once
                x1, x_sq = _draw_chunk(X, x_sq_all, buf, rows, p.batch, g)
                views = None
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
                    views = _step_views(x1, p)
                state, hist, stop_at = _chunk_steps(
                    state, *(v[s0:s1] for v in views), x_sq[s0:s1] if L > 0 else None, w, p,
                    skip, first)
            if stop_at is not None:
                j = int(stop_at)  # the one host sync of these steps
                if j < L:
                    return _centres(hist[skip + j], d), start + s0 + skip + j + 1
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

