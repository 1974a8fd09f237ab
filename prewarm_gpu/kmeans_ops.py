"""MiniBatchKMeans's arithmetic on the device: distances, the exact rescaling, k-means++'s rounds.

Pure functions of tensors for :class:`~prewarm_gpu.kmeans.MiniBatchKMeans`; the random draws stay
with the estimator. Distances use scikit-learn's expression ``‖c‖² - 2 x·c`` in float64 (exact
enough for the batch inertia too, and never TF32). **Scale-free**: the fit runs on X divided by a
power of two (exact, :func:`_pow2_scale`) that brings ``max |X|`` into [1, 2), and the scores have
no constant term, so a fit of ``2^j X`` gives ``2^j`` times the centres and the same labels bit for
bit, and any scale from float64's smallest to its largest values fits (float32's likewise).
Temporaries are bounded: whole-X passes run in row blocks of at most ``_CHUNK`` elements.
:func:`no_autocast` keeps this arithmetic (and Pre-Warm's) in float32/float64 under a caller's
``torch.autocast``.
"""

from __future__ import annotations

import contextlib
import math

import torch

_CHUNK = 1 << 22  # elements of a label block (rows · (k + d + 1)); bounds temporary memory
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


def _kmeans_plusplus_rounds(xs: torch.Tensor, first: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """k-means++'s k-1 greedy rounds given its draws: a pure function of tensors (capturable).

    scikit-learn's ``_kmeans_plusplus`` on R subsamples at once: each next centre is the best of
    ``t = 2 + int(ln k)`` candidates drawn ∝ D², the one that lowers the total potential most.
    Points are addressed by flat indices into the (R·m, d) stack. Distances by the float64
    expansion in one product: ``[c, ‖c‖², 1] · [-2x, 1, ‖x‖²]``.

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

