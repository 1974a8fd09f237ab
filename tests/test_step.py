"""The training step as a pure function of device tensors (training.step): the same bits as a
loop over CosineAnnealingLR, no host sync, traceable whole by TorchDynamo (the CPU's proof of
capture-safety), and CUDA-graph capture with an eager fallback."""

import copy
import math
import warnings

import pytest
import torch

from prewarm_gpu.counters import count_dispatch
from prewarm_gpu.models import SimpleCNN
from prewarm_gpu.precision import forward_autocast
from prewarm_gpu.train import BACKENDS as ALL_BACKENDS
from prewarm_gpu.train import TrainConfig, cosine_lr, train_batched
from prewarm_gpu.training.backends import make_stack
from prewarm_gpu.training.step import GraphedStep, TrainStep, lr_table, make_runner

BACKENDS = [b for b in ALL_BACKENDS if b != "auto"]  # every backend the trainer has


def _models(n, size=8):
    out = []
    for s in range(n):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(s)
            out.append(SimpleCNN(1, 10, size))
    return out


def _step(digits, backend, cfg, runs=2):
    stack = make_stack(backend, _models(runs), digits.device, False, (8, 8))
    return TrainStep(stack, digits, cfg, runs, lambda: forward_autocast("fp32", digits.device),
                     capturable=False)


def _indices(digits, runs, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, digits.train_x.shape[0], (runs, batch), generator=g)


@pytest.mark.parametrize("steps, t_max", [(50, 50), (40, 60), (7, 5000)])
def test_lr_table_is_the_schedulers_values_and_the_cosine(steps, t_max):
    cfg = TrainConfig(steps=steps, schedule_steps=t_max, lr_start=3e-3, lr_end=3e-5)
    table = lr_table(cfg, torch.device("cpu"))
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=3e-5)
    want = []
    for _ in range(steps):  # what the loop that calls scheduler.step() after each step uses
        want.append(opt.param_groups[0]["lr"])
        p.grad = torch.zeros(1)
        opt.step()
        sched.step()
    assert table.dtype == torch.float64 and table.tolist() == want  # bit for bit
    closed = [cosine_lr(t, t_max, 3e-3, 3e-5) for t in range(steps)]
    assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(want, closed, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_step_traces_whole_with_dynamo_and_matches_eager(digits, one_thread, backend):
    """The CPU's proof of capture-safety: the step's forward (batch gather, standardisation, every
    backend's forward and loss) and its bookkeeping (the loss at the device counter's index, the
    counter) trace as ONE graph each (``fullgraph=True``: any ``.item()``, data-dependent branch or
    graph break fails). Between them run ``backward()`` and the fused Adam, which TorchDynamo does
    not trace by design but PyTorch captures as a CUDA graph (``Adam(capturable=True)``)."""
    cfg = TrainConfig(steps=4, batch_size=16)
    ts = _step(digits, backend, cfg)
    ts.idx = _indices(digits, 2, 16)
    torch._dynamo.reset()
    loss = torch.compile(ts.loss, backend="eager", fullgraph=True, dynamic=False)
    record = torch.compile(ts.record, backend="eager", fullgraph=True, dynamic=False)
    traced = loss()
    eager = ts.loss()  # train-mode BatchNorm: outputs from batch statistics, equal
    for a, b in zip(traced, eager, strict=True):
        assert torch.equal(a, b)
    record(*traced)
    ts.record(*eager)
    assert ts.t.tolist() == [2] and torch.equal(ts.losses[0], ts.losses[1])


def test_a_host_sync_in_the_step_would_fail_the_proof(digits, one_thread):
    """The proof can fail: the same trace of a step that reads a value on the host is refused."""
    ts = _step(digits, "loop", TrainConfig(steps=2, batch_size=16), runs=1)
    ts.idx = _indices(digits, 1, 16)

    def bad():
        objective, main = ts.loss()
        if objective.sum().item() > 0:  # a host read
            return objective
        return main

    torch._dynamo.reset()
    with pytest.raises(Exception, match="(?i)item|graph break|data-dependent|Unsupported"):
        torch.compile(bad, backend="eager", fullgraph=True, dynamic=False)()


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_steps_never_sync_and_count_their_ops(digits, one_thread, backend):
    cfg = TrainConfig(steps=6, batch_size=16)
    ts = _step(digits, backend, cfg)
    idx = [_indices(digits, 2, 16, seed=s) for s in range(6)]
    ts.eager(idx[0])  # Adam's state is created at the first step
    with count_dispatch() as c:
        for i in idx[1:]:
            ts.eager(i)
    assert c.n_syncs == 0, c.syncs
    assert ts.t.tolist() == [6] and torch.isfinite(ts.losses).all()


def test_graphs_option_is_checked(digits):
    ts = _step(digits, "loop", TrainConfig(steps=2, batch_size=16), runs=1)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        make_runner(ts, "on", torch.device("cpu"))
    with pytest.raises(ValueError, match="graphs must be one of"):
        make_runner(ts, "sometimes", torch.device("cpu"))
    assert make_runner(ts, "auto", torch.device("cpu")) == ts.eager  # auto: graphs on CUDA only
    with pytest.raises(ValueError, match="graphs must be one of"):
        train_batched(_models(1), digits, TrainConfig(steps=1), seeds=[0], graphs="yes")


def test_graphs_on_without_cuda_is_exit_2_before_any_training(tmp_path, capsys):
    from prewarm_gpu import cli

    code = cli.main(["reproduce", "--out", str(tmp_path / "r"), "--steps", "2", "--seeds", "1",
                     "--device", "cpu", "--graphs", "on", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--graphs on needs a CUDA device" in err, err
    assert not (tmp_path / "r").exists()


def test_a_failed_capture_falls_back_to_eager_with_one_warning(digits, one_thread, monkeypatch):
    """Capture cannot run on a CPU: make it raise, as a capture failure on CUDA would, and the
    graphed runner warns once naming the cause and trains eagerly, the same bits."""
    cfg = TrainConfig(steps=5, batch_size=16)
    idx = [_indices(digits, 2, 16, seed=s) for s in range(5)]
    ref = _step(digits, "grouped", cfg)
    for i in idx:
        ref.eager(i)

    class NoCapture:
        def __init__(self):
            raise RuntimeError("capture is not possible here")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", NoCapture)
    ts = _step(digits, "grouped", cfg)
    runner = GraphedStep(ts, warmup=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in idx:
            runner(i)
    msgs = [str(w.message) for w in caught if "CUDA graph" in str(w.message)]
    assert len(msgs) == 1 and "capture is not possible here" in msgs[0], msgs
    assert torch.equal(ts.losses, ref.losses)
    for a, b in zip(ts.stack.parameters(), ref.stack.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_steps_equal_eager_steps_bit_for_bit(digits, backend):
    dev = torch.device("cuda")
    data = copy.copy(digits).to(dev) if hasattr(digits, "to") else None
    if data is None:
        from prewarm_gpu.data import load_dataset

        data = load_dataset("digits", device="cuda")
    cfg = TrainConfig(steps=12, batch_size=64)
    results = []
    for graphs in ("off", "on"):
        models = [m.to(dev) for m in _models(2)]
        res = train_batched(models, data, cfg, seeds=[0, 1], backend=backend, graphs=graphs)
        results.append(([r.loss for r in res], [m.state_dict() for m in models]))
    (l0, s0), (l1, s1) = results
    assert l0 == l1
    for a, b in zip(s0, s1, strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_compile_puts_the_steps_forward_through_torch_compile(digits, one_thread, monkeypatch):
    """``compile=True`` compiles the forward (its backward with it), once per step object, with
    fixed shapes; here with TorchDynamo's eager backend (inductor's code generation is the GPU's
    business): the same bits as the uncompiled step."""
    seen = []
    real = torch.compile

    def spy(fn, **kw):
        seen.append(kw)
        return real(fn, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", spy)
    torch._dynamo.reset()
    cfg = TrainConfig(steps=6, eval_points=1, loss_points=6)
    a, b = _models(2), _models(2)
    ra = train_batched(a, digits, cfg, seeds=[0, 1], backend="grouped", compile=True)
    rb = train_batched(b, digits, cfg, seeds=[0, 1], backend="grouped")
    assert seen == [{"dynamic": False}]
    assert [r.loss for r in ra] == [r.loss for r in rb]


def test_count_dispatch_patches_torch_tensor_only_inside_its_block():
    names = ("tolist", "numpy", "cpu")
    before = {n: torch.Tensor.__dict__.get(n) for n in names}
    with count_dispatch() as outer:
        torch.ones(2).tolist()
        with count_dispatch() as inner:
            torch.ones(2).cpu()
    assert outer.syncs["Tensor.tolist"] == 1 and outer.syncs["Tensor.cpu"] == 1
    assert inner.syncs["Tensor.cpu"] == 1 and inner.syncs["Tensor.tolist"] == 0
    with pytest.raises(KeyError), count_dispatch():
        raise KeyError("inside")
    assert {n: torch.Tensor.__dict__.get(n) for n in names} == before
