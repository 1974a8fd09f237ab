"""MiniBatchKMeans's loop on the device: the mini-batch step, a chunk of steps, the stopping rule.

The GPU's cost at these sizes is launches and syncs, not arithmetic, so the loop avoids the host:

- **One step function** (:func:`_step`) for every path: labels by ``argmin_j ‖c_j‖² - 2 x·c_j``
  (:func:`~prewarm_gpu.kmeans_ops._scores`) in float64; per-centre sums and counts accumulated
  into running sums ``T_j = [w_j c_j, w_j]``, so the update ``c_j ← (w_j c_j + Σx)/(w_j + m_j)``
  is one add and one divide; reassignment of starved centres decided with masks.
- **One stopping rule** (:func:`_stop_rule`): scikit-learn's ``_mini_batch_convergence`` (EWA of the
  batch inertia, ``max_no_improvement``, ``tol``), vectorised over a chunk of steps' inertias.
- **Chunks** (:func:`_chunk`: state and the chunk's gathered batches in; state, each step's
  running sums and the stop index out): a pure function of tensors with no host read, no branch
  on a value and no data-dependent shape. The estimator draws the batch indices for a chunk at
  once, gathers the rows, runs the chunk (eagerly or as a CUDA graph,
  :mod:`~prewarm_gpu.kmeans_graphs`) and reads one integer, the first step at which
  scikit-learn would have stopped; steps after it were computed but are discarded (the state at
  the stop is taken from the chunk's history). TorchDynamo traces it whole
  (``tests/test_kmeans_graphs.py``).
"""

from __future__ import annotations

import math

import torch

from .kmeans_ops import _F64, _augment, _scores


class _LoopParams:
    """The loop's constants, derived once per fit from the estimator ``km`` (its
    ``reassignment_ratio`` and ``max_no_improvement``), the data's n, k, the batch and ``tol``
    (already scaled by the data's variance)."""

    def __init__(self, km, n: int, k: int, batch: int, tol: float):
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


def _initial_state(c: torch.Tensor) -> tuple:
    """:func:`_chunk`'s state before the first step, from the initial centres c (k, d) float64.

    A centre's count starts at ε = 2⁻⁶⁰ rather than 0, so ``T / w`` is its initial centre until
    its first update; the stopping rule's carry starts with no EWA and no minimum yet.
    """
    dev = c.device
    T = _augment(c) * 2.0**-60
    c_sq = (c * c).sum(1, keepdim=True)
    carry = (c.new_zeros((), dtype=_F64), c.new_full((), math.inf, dtype=_F64),
             torch.full((), -1, device=dev, dtype=torch.long))
    since = torch.zeros((), device=dev, dtype=torch.long)
    return T, c, c_sq, since, carry


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
    return _chunk_steps(state, *_step_views(x1, p), x_sq, weights, p, skip, first)


def _step_views(x1: torch.Tensor, p: _LoopParams) -> tuple[tuple, tuple, tuple]:
    """Per-step views of a chunk's batches x1 (L, b, d+1): ``(xs, xts, cands)``, L each: the
    ``[x, 1]`` rows, the points transposed (d, b), and the rows reassigned centres move to
    (:func:`_step`'s ``cand``; None when k exceeds the batch)."""
    d = x1.shape[-1] - 1
    xs = x1.unbind(0)
    cands = x1[:, : p.k].unbind(0) if p.k <= p.batch else (None,) * x1.shape[0]
    xts = x1[..., :d].transpose(1, 2).unbind(0)  # the points, without the count column
    return xs, xts, cands


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


def _looks(budget: int, S: int, look_every: int):
    """``(start, rows, s0, s1)`` for every look of the host at the loop: chunks of S steps from
    step ``start`` (``rows`` of them: the last chunk is shorter), each looked at after its steps
    ``[s0, s1)``."""
    for start in range(0, budget, S):
        rows = min(S, budget - start)
        for s0 in range(0, rows, look_every):
            yield start, rows, s0, min(s0 + look_every, rows)


def _centres(T: torch.Tensor, d: int) -> torch.Tensor:
    """Centres ``T / w`` as (k, d) float64 from the running sums (k, d+1)."""
    return T[:, :d] / T[:, d:]
