"""scikit-learn's MiniBatchKMeans, in batched torch ops on the data's device.

The algorithm is scikit-learn's (``sklearn/cluster/_kmeans.py``, ``MiniBatchKMeans.fit``): a
validation subsample; ``n_init`` greedy k-means++ candidates, each on its own init subsample, scored
by inertia on the validation subsample (here the candidates are computed *together*, as one batched
problem); one mini-batch loop from the best candidate with count-weighted centre updates, random
reassignment of starved centres and early stopping on an exponentially weighted average of the batch
inertia. The random stream is torch's, so runs agree with scikit-learn in distribution, not draw for
draw; given the same initial centres and batches the centres agree to float rounding.

On CUDA there is no host round-trip per step: early stopping and reassignment are decided on the
device with masks, and the host looks at the stop flag once every ``sync_every`` steps (steps after
the stop are no-ops). On the CPU, where a sync costs nothing, the same decisions are taken on the
host with fewer ops. Labels use ``argmin_j ||c_j||² - 2 x·c_j`` (scikit-learn's own expression) on
the CPU and direct differences elsewhere (never TF32); inertia always comes from direct
differences.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from ._random import as_generator
from .rules import _is_int, all_finite

__all__ = ["MiniBatchKMeans"]

_CHUNK = 1 << 22  # elements of a distance block (n·k·d); bounds temporary memory
_IDX_BLOCK = 64  # batches of indices drawn at once (both loops draw them the same way)
_CPU_PATHS = True  # tests set this False to run every accelerator branch on the CPU


def _host_paths(device: torch.device) -> bool:
    """The CPU's branches (expanded distances, index_add, host-decided loop), or the others."""
    return device.type == "cpu" and _CPU_PATHS


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared distances by direct differences: x (..., n, d), c (..., k, d) → (..., n, k)."""
    return (x.unsqueeze(-2) - c.unsqueeze(-3)).square().sum(-1)


def _pp_dists(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor,
              c_sq: torch.Tensor) -> torch.Tensor:
    """Squared distances for k-means++ seeding: c (R, t, d) to x (R, m, d) → (R, t, m).

    On the CPU by scikit-learn's expansion ``||x||² - 2 c·x + ||c||²`` (clamped at 0; seeding is
    random anyway) with the squared norms ``x_sq`` (R, m) and ``c_sq`` (R, t) given; elsewhere by
    direct differences.
    """
    if _host_paths(x.device):
        d = torch.baddbmm(x_sq.unsqueeze(1), c, x.transpose(1, 2), alpha=-2.0)
        return d.add_(c_sq.unsqueeze(-1)).clamp_(min=0)
    return _sq_dists(c, x)


def _labels(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Nearest centre of each row of x (n, d) among c (k, d); ties go to the lower index."""
    if _host_paths(x.device):
        # scikit-learn's expression ||c||² - 2 x·c (no TF32 on the CPU).
        scores = torch.addmm(c.square().sum(1), x, c.t(), alpha=-2.0)
        return scores.min(1).indices  # first minimum on ties, as argmin; faster on the CPU
    return _sq_dists(x, c).argmin(1)


def _cluster_sums(labels: torch.Tensor, x: torch.Tensor, k: int,
                  by_product: bool | None = None) -> torch.Tensor:
    """Per-cluster sums of the rows of x (n, d) → (k, d), with the same bits on every run.

    ``index_add_`` is deterministic on the CPU; on CUDA it adds with atomics, whose order (and so
    rounding) varies between runs. There the sums are a float64 one-hot product instead: a fixed
    reduction order, more precise than float32 atomics, and never TF32.
    """
    if by_product is None:
        by_product = not _host_paths(x.device)
    if not by_product:
        return x.new_zeros(k, x.shape[1]).index_add_(0, labels, x)
    onehot = labels == torch.arange(k, device=x.device).unsqueeze(1)  # (k, n)
    return (onehot.to(torch.float64) @ x.to(torch.float64)).to(x.dtype)


def _labels_inertia(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and inertia ``Σ ||x - c_label||²`` (from direct differences), chunked over rows."""
    n, d = x.shape
    rows = max(1, _CHUNK // max(1, c.shape[0] * d))
    labels, inertia = [x.new_zeros(0, dtype=torch.long)], x.new_zeros(())
    for s in range(0, n, rows):
        xs = x[s : s + rows]
        lab = _labels(xs, c)
        labels.append(lab)
        inertia = inertia + (xs - c[lab]).square().sum()
    return torch.cat(labels), inertia


def _kmeans_plusplus(xs: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ on R subsamples at once: xs (R, m, d) → centres (R, k, d).

    scikit-learn's ``_kmeans_plusplus``: first centre uniform; each next centre is the best of
    ``2 + int(ln k)`` candidates drawn ∝ D², the one that lowers the total potential most. Points
    are addressed by flat indices into the (R·m, d) stack, and every uniform draw is made up front.
    """
    R, m, d = xs.shape
    dev = xs.device
    trials = 2 + int(math.log(k))
    flat = xs.reshape(R * m, d)
    x_sq = xs.square().sum(-1)  # (R, m)
    x_sq_flat = x_sq.reshape(-1)
    offset = torch.arange(R, device=dev).unsqueeze(1) * m  # flat index of each subsample's row 0
    chosen = torch.randint(0, m, (R, 1), generator=g, device=dev) + offset  # (R, 1)
    u = torch.rand(k - 1, R, trials, generator=g, device=dev, dtype=torch.float64)
    first = flat.index_select(0, chosen.reshape(-1)).view(R, 1, d)
    closest = _pp_dists(xs, x_sq, first, x_sq_flat[chosen]).squeeze(1)  # (R, m): D² so far
    pot = closest.sum(1, keepdim=True, dtype=torch.float64)  # (R, 1)
    picks = [chosen]
    for j in range(k - 1):
        cum = closest.cumsum(1, dtype=torch.float64)
        cand = torch.searchsorted(cum, u[j] * pot).clamp_(max=m - 1).add_(offset)  # (R, t)
        pts = flat.index_select(0, cand.reshape(-1)).view(R, trials, d)
        d_cand = torch.minimum(_pp_dists(xs, x_sq, pts, x_sq_flat[cand]), closest.unsqueeze(1))
        pot, best = d_cand.sum(-1, dtype=torch.float64).min(1, keepdim=True)  # first on ties
        closest = d_cand.gather(1, best.unsqueeze(-1).expand(R, 1, m)).squeeze(1)
        picks.append(cand.gather(1, best))
    return flat.index_select(0, torch.cat(picks, 1).reshape(-1)).view(R, k, d)


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
        n_init: k-means++ candidates (computed together); the best on a validation subsample wins.
        batch_size: points per step (capped at n).
        max_iter: epochs of budget: at most ``(max_iter · n) // batch_size`` steps.
        init_size: size of each init subsample (default ``3 · batch_size``, capped at n).
        max_no_improvement: stop after this many steps without a new minimum of the smoothed
            inertia (``None`` disables early stopping).
        reassignment_ratio: centres whose count is below this fraction of the largest count are
            moved to random batch points.
        tol: stop when the squared centre movement falls to ``tol · mean(var(X))`` (0: off).
        random_state: ``None``, an ``int`` seed or a ``torch.Generator`` on X's device.
        sync_every: steps between host checks of the stop flag (default 1 on the CPU, where a
            check is free, and 16 elsewhere).

    Example:
        >>> km = MiniBatchKMeans(16, random_state=0).fit(torch.randn(5000, 9))
        >>> km.cluster_centers_.shape
        torch.Size([16, 9])
    """

    def __init__(
        self,
        n_clusters: int,
        *,
        n_init: int = 3,
        batch_size: int = 1024,
        max_iter: int = 100,
        init_size: int | None = None,
        max_no_improvement: int | None = 10,
        reassignment_ratio: float = 0.01,
        tol: float = 0.0,
        random_state: int | torch.Generator | None = None,
        sync_every: int | None = None,
    ):
        self.n_clusters = n_clusters
        self.n_init = n_init
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.init_size = init_size
        self.max_no_improvement = max_no_improvement
        self.reassignment_ratio = reassignment_ratio
        self.tol = tol
        self.random_state = random_state
        self.sync_every = sync_every

    # ------------------------------------------------------------------ validation
    def _check_params(self) -> None:
        def is_real(v):
            return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("n_clusters", "n_init", "batch_size", "max_iter"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("init_size", "sync_every"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise ValueError(f"{name} must be None or a positive int, got {v!r}")
        v = self.max_no_improvement
        if v is not None and (not _is_int(v) or v < 0):
            raise ValueError(f"max_no_improvement must be None or an int >= 0, got {v!r}")
        for name in ("reassignment_ratio", "tol"):
            v = getattr(self, name)
            if not is_real(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")

    def _check_X(self, X) -> torch.Tensor:
        if isinstance(X, np.ndarray):
            X = torch.from_numpy(X)
        if not isinstance(X, torch.Tensor):
            raise TypeError(f"X must be a torch.Tensor or numpy array, got {type(X).__name__}")
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D (n_samples, n_features), got shape {tuple(X.shape)}")
        if X.dtype == torch.uint8:
            X = X.float()
        if not X.is_floating_point():
            raise TypeError(f"X must be floating point or uint8, got {X.dtype}")
        X = X.to(_compute_dtype(X.dtype))
        if not all_finite(X):
            raise ValueError("X contains NaN or Inf")
        return X.contiguous()

    # ------------------------------------------------------------------ fit
    def fit(self, X) -> MiniBatchKMeans:
        """Cluster the rows of X (n, d) on X's device; returns ``self``."""
        self._check_params()
        X = self._check_X(X)
        if X.shape[0] < self.n_clusters:
            raise ValueError(f"n_samples={X.shape[0]} should be >= n_clusters={self.n_clusters}.")
        return self._fit(X)

    def _fit(self, X: torch.Tensor) -> MiniBatchKMeans:
        """:meth:`fit` on valid input: finite, contiguous float32/float64 X with n ≥ k rows."""
        n, d = X.shape
        k = int(self.n_clusters)
        dev = X.device
        g = as_generator(self.random_state, dev)
        batch = min(int(self.batch_size), n)
        init_size = int(self.init_size) if self.init_size is not None else 3 * batch
        if init_size < k:
            init_size = 3 * k
        init_size = min(init_size, n)

        # Initialisation: validation subsample, then n_init k-means++ candidates at once.
        valid = X[torch.randint(0, n, (init_size,), generator=g, device=dev)]
        if init_size < n:
            sub = torch.randint(0, n, (int(self.n_init), init_size), generator=g, device=dev)
            xs = X[sub]
        else:
            xs = X.unsqueeze(0).expand(int(self.n_init), n, d)
        cands = _kmeans_plusplus(xs, k, g)  # (n_init, k, d)
        cand_inertia = torch.stack([_labels_inertia(valid, c)[1] for c in cands])
        centres = cands[cand_inertia.argmin()].clone()  # ties keep the first candidate

        tol = 0.0
        if self.tol > 0:
            tol = float(X.var(0, unbiased=False).mean()) * self.tol
        centres, n_steps = self._run(X, centres, g, batch, tol)

        self.cluster_centers_ = centres
        self.n_steps_ = n_steps
        self.n_iter_ = int(math.ceil(n_steps * batch / n))
        self.labels_, inertia = _labels_inertia(X, centres)
        self.inertia_ = float(inertia)
        self.init_inertia_ = float(cand_inertia.min())
        return self

    def _run(self, X, centres, g, batch, tol):
        """The mini-batch loop; returns the final centres and the number of steps taken."""
        n = X.shape[0]
        budget = (int(self.max_iter) * n) // batch
        sync_every = int(self.sync_every or (1 if _host_paths(X.device) else 16))
        state = _LoopState(self, n, batch, tol)
        if sync_every == 1:
            return self._run_host(X, centres, g, batch, budget, state)
        return self._run_device(X, centres, g, batch, budget, state, sync_every)

    def _run_host(self, X, centres, g, batch, budget, st, indices=None):
        """Step loop with decisions on the host: the fast path where a sync costs nothing (CPU).

        Sums and counts come from one ``index_add`` of ``[x, 1]`` rows; the update
        ``c + (Σx - m·c) / (w + m)`` equals ``(w·c + Σx) / (w + m)`` and leaves empty centres as
        they are.
        """
        n, k, d, dev, dt = X.shape[0], int(self.n_clusters), X.shape[1], X.device, X.dtype
        X1 = torch.cat([X, X.new_ones(n, 1)], 1)
        counts = torch.zeros(k, device=dev, dtype=dt)
        since = 0
        step = 0
        while step < budget:
            idx = _draw_indices(n, min(_IDX_BLOCK, budget - step), batch, g, dev, indices, step)
            block = X1.index_select(0, idx.reshape(-1)).view(idx.shape[0], batch, d + 1)
            for xb1 in block:  # one gather per block of batches: cheaper than one per step
                xb = xb1[:, :d]
                labels = _labels(xb, centres)
                batch_inertia = float(torch.nn.functional.mse_loss(
                    xb, centres.index_select(0, labels), reduction="sum"))
                acc = _cluster_sums(labels, xb1, k)  # sums and counts
                m = acc[:, d]
                new_counts = counts + m
                new_centres = torch.addcdiv(
                    centres, torch.addcmul(acc[:, :d], m[:, None], centres, value=-1),
                    new_counts.clamp(min=1)[:, None])
                if st.ratio > 0:
                    since += batch
                    if since >= 10 * k or bool((counts == 0).any()):
                        since = 0
                        lo, hi = torch.aminmax(new_counts)
                        if float(lo) < st.ratio * float(hi):
                            new_centres, new_counts = self._reassign_host(
                                xb, new_centres, new_counts, st, g)
                moved = float((new_centres - centres).square().sum()) if st.tol > 0 else 0.0
                centres, counts = new_centres, new_counts
                step += 1
                if st.converged(step, batch_inertia, moved):
                    return centres, step
        return centres, step

    def _reassign_host(self, xb, centres, counts, st, g):
        """scikit-learn's ``_random_reassign``: starved centres jump to random batch points."""
        low = counts < st.ratio * counts.max()
        if self.n_clusters > st.max_reassign:  # at most half a batch: only the lightest
            low &= counts.argsort(stable=True).argsort() < st.max_reassign
        r = int(low.sum())
        if r:
            pick = torch.randperm(xb.shape[0], generator=g, device=xb.device)[:r]
            centres = centres.clone()
            counts = counts.clone()
            centres[low] = xb.index_select(0, pick)
            counts[low] = counts[~low].min()
        return centres, counts

    def _run_device(self, X, centres, g, batch, budget, st, sync_every, indices=None):
        """Step loop with every decision on the device (masks); the host looks every few steps."""
        n, k, dev, dt = X.shape[0], int(self.n_clusters), X.device, X.dtype
        counts = torch.zeros(k, device=dev, dtype=dt)
        ewa = torch.zeros((), device=dev, dtype=dt)
        ewa_min = torch.full((), math.inf, device=dev, dtype=dt)
        no_improve = torch.zeros((), device=dev, dtype=torch.long)
        since_reassign = torch.zeros((), device=dev, dtype=torch.long)
        stopped = torch.zeros((), device=dev, dtype=torch.bool)
        steps = torch.zeros((), device=dev, dtype=torch.long)
        patience = self.max_no_improvement

        i = 0
        while i < budget:
            idx = _draw_indices(n, min(_IDX_BLOCK, budget - i), batch, g, dev, indices, i)
            for j0 in range(0, idx.shape[0], sync_every):
                block = min(sync_every, idx.shape[0] - j0)
                if st.ratio > 0:
                    # Random rows of each batch, without replacement, for reassigned centres.
                    pick = torch.rand(block, batch, generator=g, device=dev).argsort(1)[:, :k]
                for s in range(block):
                    step = i + s
                    active = ~stopped
                    xb = X.index_select(0, idx[j0 + s])
                    labels = _labels(xb, centres)
                    batch_inertia = (xb - centres[labels]).square().sum()
                    m = torch.bincount(labels, minlength=k).to(dt)
                    sums = _cluster_sums(labels, xb, k)
                    new_counts = counts + m
                    upd = (centres * counts[:, None] + sums) / new_counts.clamp(min=1e-30)[:, None]
                    new_centres = torch.where((m > 0)[:, None], upd, centres)

                    if st.ratio > 0:
                        since = since_reassign + batch
                        check = (counts == 0).any() | (since >= 10 * k)
                        since_reassign = torch.where(
                            active, torch.where(check, 0, since), since_reassign
                        )
                        low = new_counts < st.ratio * new_counts.max()
                        if k > st.max_reassign:  # at most half a batch: only the lightest
                            rank = new_counts.argsort(stable=True).argsort()
                            low = low & (rank < st.max_reassign)
                        low = low & check
                        slot = (low.cumsum(0) - 1).clamp(min=0)
                        new_centres = torch.where(low[:, None], xb[pick[s][slot]], new_centres)
                        floor = torch.where(low, math.inf, new_counts).min()
                        new_counts = torch.where(low, floor, new_counts)

                    moved = (new_centres - centres).square().sum() if st.tol > 0 else None
                    centres = torch.where(active, new_centres, centres)
                    counts = torch.where(active, new_counts, counts)
                    steps = steps + active.long()

                    # Early stopping on the smoothed batch inertia (step 1 ignored).
                    if step >= 1:
                        bi = batch_inertia / batch
                        new_ewa = bi if step == 1 else ewa * (1 - st.alpha) + bi * st.alpha
                        better = new_ewa < ewa_min
                        new_no_improve = torch.where(better, 0, no_improve + 1)
                        ewa = torch.where(active, new_ewa, ewa)
                        ewa_min = torch.where(active & better, new_ewa, ewa_min)
                        no_improve = torch.where(active, new_no_improve, no_improve)
                        stop = torch.zeros((), device=dev, dtype=torch.bool)
                        if st.tol > 0:
                            stop = stop | (moved <= st.tol)
                        if patience is not None:
                            stop = stop | (no_improve >= patience)
                        stopped = stopped | (active & stop)
                i += block
                if bool(stopped):
                    return centres, int(steps)
        return centres, int(steps)

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
        return _labels_inertia(X.to(self.cluster_centers_.dtype), self.cluster_centers_)[0]


def _draw_indices(n, rows, batch, g, dev, indices, start):
    """The next ``rows`` batches of indices: drawn from ``g``, or taken from fixed ``indices``."""
    if indices is not None:
        return indices[start : start + rows]
    return torch.randint(0, n, (rows, batch), generator=g, device=dev)


def _fixed_run(X: torch.Tensor, centres: torch.Tensor, indices: torch.Tensor, *,
               reassignment_ratio: float = 0.0, sync_every: int = 1,
               generator: int | torch.Generator | None = 0):
    """Mini-batch steps from given centres over given batches, no early stopping (for tests).

    Returns (centres, counts-free steps taken). ``sync_every > 1`` runs the device loop.
    """
    km = MiniBatchKMeans(centres.shape[0], max_no_improvement=None,
                         reassignment_ratio=reassignment_ratio, sync_every=sync_every)
    batch = indices.shape[1]
    st = _LoopState(km, X.shape[0], batch, 0.0)
    g = as_generator(generator, X.device)
    if sync_every == 1:
        return km._run_host(X, centres.clone(), g, batch, indices.shape[0], st, indices)
    return km._run_device(X, centres.clone(), g, batch, indices.shape[0], st, sync_every, indices)


class _LoopState:
    """scikit-learn's ``_mini_batch_convergence`` on host scalars, plus the loop's constants."""

    def __init__(self, km: MiniBatchKMeans, n: int, batch: int, tol: float):
        self.batch = batch
        self.alpha = min(2.0 * batch / (n + 1), 1.0)
        self.ratio = float(km.reassignment_ratio)
        self.max_reassign = int(0.5 * batch)
        self.tol = tol
        self.patience = km.max_no_improvement
        self.ewa = None
        self.ewa_min = None
        self.no_improve = 0

    def converged(self, step: int, batch_inertia: float, moved: float) -> bool:
        """Called after step ``step`` (1-based) with its batch inertia; True means stop."""
        if step == 1:
            return False
        bi = batch_inertia / self.batch
        self.ewa = bi if self.ewa is None else self.ewa * (1 - self.alpha) + bi * self.alpha
        if self.tol > 0 and moved <= self.tol:
            return True
        if self.ewa_min is None or self.ewa < self.ewa_min:
            self.no_improve = 0
            self.ewa_min = self.ewa
        else:
            self.no_improve += 1
        return self.patience is not None and self.no_improve >= self.patience
