"""MiniBatchKMeans's chunk and k-means++ as pure, capturable functions (issue 27, item 1).

What the CPU can prove: TorchDynamo traces both functions whole (no graph break, no host read, no
branch on a value), on both accumulation branches, to the eager bits; one chunk's ops and syncs
are counted; the graph path's plumbing (static buffers, the cache, the eager fallback) gives the
eager bits. Capture itself and its speed need CUDA (the ``gpu`` test, and the GPU suite).
"""

import collections
import functools

import pytest
import torch
from torch.utils._pytree import tree_leaves, tree_map

from prewarm_gpu import MiniBatchKMeans, kmeans, kmeans_graphs, prewarm_
from prewarm_gpu.counters import count_dispatch
from prewarm_gpu.kmeans_loop import _chunk, _ewa_weights, _LoopParams
from prewarm_gpu.kmeans_ops import _augment, _kmeans_plusplus_rounds

F64 = torch.float64


def _chunk_call(k=16, d=9, batch=64, L=16, ratio=0.01, tol=0.0, patience=3, onehot=False,
                skip=0, first=False, seed=0):
    """``(fn, args)``: one chunk from random centres over random batches, as the fit makes it."""
    gen = torch.Generator().manual_seed(seed)
    p = _LoopParams(MiniBatchKMeans(k, reassignment_ratio=ratio, max_no_improvement=patience),
                    5000, k, batch, tol)
    if onehot:  # the branch every device but the CPU takes
        p.arange_k = torch.arange(k).unsqueeze(1)
    c = torch.randn(k, d, generator=gen, dtype=F64)
    state = (_augment(c) * 2.0**-60, c, (c * c).sum(1, keepdim=True),
             torch.zeros((), dtype=torch.long),
             (torch.zeros((), dtype=F64), torch.tensor(float("inf"), dtype=F64),
              torch.tensor(-1)))
    x1 = _augment(torch.randn(L, batch, d, generator=gen, dtype=F64))
    x_sq = x1[..., :d].square().sum((1, 2))
    weights = _ewa_weights(L - skip, p.alpha, "cpu") if L > skip else None
    return functools.partial(_chunk, weights=weights, p=p, skip=skip, first=first), \
        (state, x1, x_sq)


def _pp_call(R=3, m=200, d=5, k=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(R, m, d, generator=gen)
    first = torch.randint(0, m, (R, 1), generator=gen)
    u = torch.rand(k - 1, R, 2 + int(torch.tensor(k).log()), generator=gen, dtype=F64)
    return _kmeans_plusplus_rounds, (xs, first, u)


def _same_bits(a, b):
    la, lb = tree_leaves(a), tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        if x is None or y is None:  # a chunk that judges no step has no stop index
            assert x is None and y is None
            continue
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y), (x, y)


def _traced(fn):
    torch._dynamo.reset()
    # TorchDynamo alone (no code generation): fails on a graph break, an .item(), a branch on a
    # tensor's value or a data-dependent shape.
    return torch.compile(lambda *a: fn(*a), backend="eager", fullgraph=True, dynamic=False)


CHUNKS = [
    {},  # k ≤ batch, reassignment checked by the counter
    {"k": 4},  # batch ≥ 10 k: reassignment checked every step
    {"k": 80, "ratio": 0.3, "tol": 1e-3, "skip": 1, "first": True},  # k > batch, tol, first chunk
    {"ratio": 0.0, "patience": None, "L": 5},
    {"L": 1, "skip": 1, "first": True},  # the host loop's first step: nothing judged
]


# ----------------------------------------------------------------- proof on the CPU
@pytest.mark.parametrize("onehot", [False, True], ids=["index_add", "one-hot"])
@pytest.mark.parametrize("options", CHUNKS)
def test_chunk_traces_whole_to_the_eager_bits(options, onehot):
    fn, args = _chunk_call(onehot=onehot, **options)
    eager = fn(*args)
    traced = _traced(fn)(*args)
    _same_bits(traced, eager)
    if options.get("L", 16) > options.get("skip", 0):
        assert eager[2] is not None and eager[2].dtype == torch.long


@pytest.mark.parametrize("k", [1, 2, 8])
def test_kmeans_plusplus_traces_whole_to_the_eager_bits(k):
    fn, args = _pp_call(k=k)
    _same_bits(_traced(fn)(*args), fn(*args))


def test_a_host_read_inside_is_refused_by_the_trace():
    # The proof's teeth: the same trace refuses a function that reads a value on the host.
    def bad(x):
        if x.sum().item() > 0:
            return x + 1
        return x

    with pytest.raises(Exception, match="(?i)data-dependent|graph break|item"):
        _traced(bad)(torch.ones(3))


# ----------------------------------------------------------------- counted on the CPU
# Measured when the chunk became a function (16 steps, k=16, d=9, batch 64, reassignment checked
# by the counter): 415 ATen ops with index_add, 447 with the one-hot sums (2 more per step), the
# same ops the loop ran inline before it (less one slice); a GPU launches about one kernel each.
@pytest.mark.parametrize("onehot, bound", [(False, 415), (True, 447)])
def test_one_chunk_dispatches_a_bounded_number_of_ops_and_no_sync(onehot, bound):
    fn, args = _chunk_call(onehot=onehot)
    with count_dispatch() as c:
        fn(*args)
    assert c.n_syncs == 0, dict(c.syncs)
    assert c.n_ops <= bound, (c.n_ops, c.ops.most_common(8))


def test_a_fit_chunk_dispatches_no_more_than_before():
    # Budgets of exactly 16 and 32 steps: their difference is one whole chunk (draw, gather, the
    # chunk, the host's read). Before the chunk was a function (commit 8b6ec4e): 293 ops, 1 sync.
    X = torch.randn(4096, 27, generator=torch.Generator().manual_seed(0))
    ops, syncs = [], []
    for max_iter in (4, 8):
        km = MiniBatchKMeans(16, random_state=0, max_no_improvement=None, max_iter=max_iter,
                             graphs=False)
        with count_dispatch() as c:
            km.fit(X)
        ops.append(c.n_ops)
        syncs.append(c.n_syncs)
    assert km.n_steps_ == 32
    assert ops[1] - ops[0] <= 293, ops
    assert syncs[1] - syncs[0] == 1, syncs


# ----------------------------------------------------------------- the graph path, on the CPU
def _replaying_capture(log):
    """A stand-in for ``kmeans_graphs._capture`` with a CUDA graph's semantics: static inputs, and
    outputs at fixed addresses that every replay overwrites."""
    def capture(fn, args):
        log.append(getattr(fn, "func", fn).__name__)
        static_in = tree_map(torch.Tensor.clone, args)
        static_out = fn(*static_in)

        def replay():
            for o, n in zip(tree_leaves(static_out), tree_leaves(fn(*static_in)), strict=True):
                if o is not None:
                    o.copy_(n)
        return static_in, static_out, replay
    return capture


def _fits(X, **kw):
    km = MiniBatchKMeans(**{"n_clusters": 8, "batch_size": 64, "random_state": 0, **kw}).fit(X)
    return km.cluster_centers_, km.labels_, torch.tensor(km.n_steps_)


@pytest.mark.parametrize("options", [
    {"loop": "device"},
    {"loop": "host"},
    {"loop": "device", "tol": 1e-3, "sync_every": 5},
    {"loop": "host", "n_clusters": 80, "reassignment_ratio": 0.3},  # k > batch
])
def test_graph_path_plumbing_gives_the_eager_bits(monkeypatch, options):
    X = torch.randn(1500, 6, generator=torch.Generator().manual_seed(1))
    eager = _fits(X, graphs=False, **options)
    log = []
    monkeypatch.setattr(kmeans_graphs, "_GRAPHS", collections.OrderedDict())
    monkeypatch.setattr(kmeans, "_resolve_graphs", lambda graphs, device: True)
    monkeypatch.setattr(kmeans_graphs, "_capture", _replaying_capture(log))
    _same_bits(_fits(X, **options), eager)
    assert log and log[0] == "_kmeans_plusplus_rounds" and set(log[1:]) == {"_chunk"}
    n = len(log)
    _same_bits(_fits(X, **options), eager)  # the same sizes again: replayed from the cache
    assert len(log) == n


def test_failed_capture_falls_back_to_eager_with_one_warning(monkeypatch):
    X = torch.randn(1500, 6, generator=torch.Generator().manual_seed(1))
    eager = _fits(X, graphs=False)

    def refuse(fn, args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(kmeans_graphs, "_GRAPHS", collections.OrderedDict())
    monkeypatch.setattr(kmeans, "_resolve_graphs", lambda graphs, device: True)
    monkeypatch.setattr(kmeans_graphs, "_capture", refuse)
    with pytest.warns(RuntimeWarning) as record:
        got = _fits(X)
    assert len(record) == 1
    assert "_kmeans_plusplus_rounds" in str(record[0].message)
    assert "stream is capturing" in str(record[0].message)
    _same_bits(got, eager)


def test_graphs_true_is_refused_off_cuda_and_bad_values_named():
    X = torch.randn(100, 3)
    with pytest.raises(ValueError, match="graphs=True needs X on a CUDA device"):
        MiniBatchKMeans(4, graphs=True).fit(X)
    with pytest.raises(ValueError, match="graphs must be 'auto', True or False, got 'on'"):
        MiniBatchKMeans(4, graphs="on").fit(X)
    _same_bits(_fits(X, graphs="auto"), _fits(X, graphs=False))  # auto: eager on the CPU


def test_prewarm_passes_graphs_through_and_leaves_weights_on_refusal():
    conv = torch.nn.Conv2d(1, 8, 3)
    x = torch.rand(16, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    before = conv.weight.detach().clone()
    with pytest.raises(ValueError, match="graphs=True needs X on a CUDA device"):
        prewarm_(conv, x, kmeans_options={"graphs": True}, generator=0)
    assert torch.equal(conv.weight, before)
    with pytest.raises(ValueError, match="graphs must be"):
        prewarm_(conv, x, kmeans_options={"graphs": "on"}, generator=0)
    a, b = torch.nn.Conv2d(1, 8, 3), torch.nn.Conv2d(1, 8, 3)
    b.load_state_dict(a.state_dict())
    prewarm_(a, x, kmeans_options={"graphs": False}, generator=0)
    prewarm_(b, x, generator=0)
    assert torch.equal(a.weight, b.weight)


# ----------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("options", [
    {"loop": "device"},
    {"loop": "host"},
    {"loop": "device", "tol": 1e-3, "n_clusters": 80, "reassignment_ratio": 0.3},
])
def test_cuda_graphs_give_the_eager_bits(options):
    X = torch.randn(7168, 27, generator=torch.Generator().manual_seed(0)).cuda()
    eager = _fits(X, graphs=False, **options)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would hide that nothing was captured
        graphed = _fits(X, graphs=True, **options)
        again = _fits(X, graphs=True, **options)  # replayed from the cache
    _same_bits(graphed, eager)
    _same_bits(again, eager)
