"""What "fp32", "tf32" and "bf16" mean inside training and the initialisers (issues 30 and 31).

The CUDA flags (TF32, cuDNN determinism) cost nothing on the CPU, so the trainer sets them on every
device and these tests observe them from inside a convolution call; the CUDA-only consequences
are the ``gpu`` tests at the end.
"""

import hashlib
import re
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch import nn

from prewarm_gpu import precision as P
from prewarm_gpu.experiment import SweepConfig, build_arm, plan_runs
from prewarm_gpu.methods.datadep import datadep_
from prewarm_gpu.methods.lsuv import lsuv_
from prewarm_gpu.models import SimpleCNN
from prewarm_gpu.train import BACKENDS as ALL_BACKENDS
from prewarm_gpu.train import TrainConfig, evaluate, train_batched

BACKENDS = [b for b in ALL_BACKENDS if b != "auto"]  # every backend the trainer has


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _model(seed=42):
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return SimpleCNN(1, 10, 8)


def _everything() -> dict[str, object]:
    """Every flag either API shows, a read that raises recorded as its error's type: the caller's
    whole state, to check that a scope restores it exactly."""
    B = torch.backends
    reads = {
        "top": lambda: B.fp32_precision,
        "cudnn": lambda: B.cudnn.fp32_precision,
        "legacy.cudnn": lambda: B.cudnn.allow_tf32,
        "legacy.matmul": lambda: B.cuda.matmul.allow_tf32,
        "matmul_precision": torch.get_float32_matmul_precision,
    }
    out = {}
    for name, read in reads.items():
        try:
            out[name] = read()
        except (AttributeError, RuntimeError) as e:
            out[name] = type(e).__name__
    return {**out, **P.float32_state()}


@pytest.fixture
def restore_flags():
    """Put back whatever a test did to the global flags (the test itself may set odd states)."""
    B = torch.backends
    new = P.uses_new_api()
    saved = P.float32_state()
    matmul = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(matmul)
    if new:
        for name in ("top", "cudnn"):
            mod = B if name == "top" else B.cudnn
            mod.fp32_precision = "none"
    P._set(saved)


class _Probe:
    """Records :func:`float32_state` from inside every ``Conv2d`` call (the grouped, vmap and loop
    backends run their convolutions through ``Conv2d._conv_forward``, vmap's ``functional_call``
    included) and every ``torch.baddbmm`` (the bmm backend's layers are batched products)."""

    def __init__(self, monkeypatch):
        self.seen: list[dict[str, object]] = []
        original, baddbmm = nn.Conv2d._conv_forward, torch.baddbmm

        def conv_forward(conv, x, weight, bias):
            self.seen.append(P.float32_state())
            return original(conv, x, weight, bias)

        def seen_baddbmm(*args, **kwargs):
            self.seen.append(P.float32_state())
            return baddbmm(*args, **kwargs)

        monkeypatch.setattr(nn.Conv2d, "_conv_forward", conv_forward)
        monkeypatch.setattr(torch, "baddbmm", seen_baddbmm)


def _expected(mode: str) -> dict[str, object]:
    if P.uses_new_api():
        want: dict[str, object] = {"cudnn.conv": mode, "cudnn.rnn": mode, "cuda.matmul": mode}
        if mode == "ieee":
            want.update({"mkldnn.conv": "ieee", "mkldnn.matmul": "ieee"})
    else:
        want = {"cudnn.allow_tf32": mode == "tf32", "cuda.matmul.allow_tf32": mode == "tf32"}
    return {**want, "deterministic": True, "benchmark": False}


def _assert_seen(seen: list[dict[str, object]], mode: str) -> None:
    assert seen, "no convolution or batched product ran"
    want = _expected(mode)
    for state in seen:
        assert {k: state[k] for k in want} == want


# --- float32_scope --------------------------------------------------------------------------------


def test_legacy_read_after_a_new_api_write_raises_the_mix_error(restore_flags):
    """Why the scope never reads the legacy flags once the new API is in use (torch ≥ 2.9)."""
    if not P.uses_new_api():
        pytest.skip("this torch has only the legacy API")
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
        _ = torch.backends.cudnn.allow_tf32
    with P.float32_scope("tf32"):  # the scope itself reads only the new API: no error
        pass


@pytest.mark.parametrize("caller", ["default", "legacy-off", "new-api-ieee", "matmul-high",
                                    "top-level-tf32"])
@pytest.mark.parametrize("mode", ["ieee", "tf32"])
def test_scope_sets_the_flags_and_restores_the_callers_exactly(restore_flags, caller, mode):
    B = torch.backends
    if caller != "default" and caller != "legacy-off" and not P.uses_new_api():
        pytest.skip("new-API caller state on a legacy-only torch")
    if caller == "legacy-off":
        B.cudnn.allow_tf32 = False
    elif caller == "new-api-ieee":
        B.cudnn.conv.fp32_precision = "ieee"
    elif caller == "matmul-high":
        torch.set_float32_matmul_precision("high")
    elif caller == "top-level-tf32":
        B.fp32_precision = "tf32"
    B.cudnn.deterministic, B.cudnn.benchmark = False, True
    before = _everything()
    with P.float32_scope(mode):
        inside = P.float32_state()
        with P.float32_scope("ieee" if mode == "tf32" else "tf32"):  # nested: restores too
            pass
        assert P.float32_state() == inside
    assert {k: inside[k] for k in _expected(mode)} == _expected(mode)
    assert _everything() == before


def test_scope_restores_after_an_exception(restore_flags):
    before = _everything()
    with pytest.raises(KeyError), P.float32_scope("tf32"):
        raise KeyError("boom")
    assert _everything() == before


def test_scope_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match=r"mode must be one of \('ieee', 'tf32'\), got 'fp16'"):
        with P.float32_scope("fp16"):
            pass


# --- the trainer and the initialisers, seen from inside a convolution -----------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision, mode", [("fp32", "ieee"), ("tf32", "tf32"),
                                             ("bf16", "ieee")])
def test_flags_inside_every_training_convolution(digits, monkeypatch, restore_flags, backend,
                                                 precision, mode):
    """fp32 is IEEE (cuDNN/cuBLAS TF32 off), tf32 turns TF32 on, cuDNN deterministic with
    benchmark off — in every convolution of training and evaluation; the caller's flags after."""
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    before = _everything()
    probe = _Probe(monkeypatch)
    cfg = TrainConfig(steps=2, eval_points=1, loss_points=2)
    res = train_batched([_model()], digits, cfg, seeds=[42], precision=precision,
                        backend=backend)
    assert res[0].status == "ok"
    _assert_seen(probe.seen, mode)
    assert _everything() == before


@pytest.mark.parametrize("init", [lsuv_, datadep_])
def test_flags_inside_the_initialisers_forward_passes(digits, monkeypatch, restore_flags, init):
    """lsuv_'s variance loop, datadep_'s standardisation and gradient ratios: IEEE fp32."""
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    if P.uses_new_api():
        torch.backends.cudnn.conv.fp32_precision = "tf32"  # the CUDA default, made explicit
    before = _everything()
    probe = _Probe(monkeypatch)
    init(_model(), digits.standardise(digits.train_x[:64]), generator=0)
    _assert_seen(probe.seen, "ieee")
    assert _everything() == before


# --- bf16 trains on every backend (issue 30, item 1) ----------------------------------------------


def _train(digits, backend, precision, steps=40):
    model = _model()
    cfg = TrainConfig(steps=steps, eval_points=1, loss_points=steps)
    res = train_batched([model], digits, cfg, seeds=[42], precision=precision, backend=backend)[0]
    assert res.status == "ok"
    return model, res


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("caller_region", [False, True], ids=["alone", "in-callers-autocast"])
def test_bf16_forward_reads_the_current_weights(digits, backend, caller_region):
    """Each bf16 forward uses the weights of that step, not a cached step-0 bf16 copy.

    Autocast caches each weight's bf16 cast until its outermost region exits: one region around
    the step loop (or a caller's own) froze the forward at the step-0 weights (loop backend:
    accuracy 0.23 against fp32's 0.99 after 150 steps; grouped: the convolutions froze). Checked
    two ways: the accuracy the trainer measured at its last step is the written-back model's,
    evaluated afterwards in a fresh region; and bf16's loss falls as fp32's does.
    """
    _, fp32 = _train(digits, backend, "fp32")
    region = torch.autocast("cpu", dtype=torch.bfloat16) if caller_region else nullcontext()
    with region:
        model, bf16 = _train(digits, backend, "bf16")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = evaluate(model.eval(), digits)
    assert abs(bf16.accuracy - fresh) <= 1 / 360 + 1e-12, (bf16.accuracy, fresh)
    # Measured (40 steps, one run): fp32 → 0.094 … 0.14; bf16 within 0.02 of it at every point
    # but the first few. Stale weights stay near ln 10 ≈ 2.3.
    assert abs(bf16.loss[-1] - fp32.loss[-1]) < 0.1, (bf16.loss[-1], fp32.loss[-1])
    assert abs(bf16.accuracy - fp32.accuracy) < 0.05, (bf16.accuracy, fp32.accuracy)


def test_fp32_inside_a_callers_autocast_region_is_still_fp32(digits):
    """A caller's bf16 region does not lower ``precision="fp32"``: the same bits as outside."""
    _, outside = _train(digits, "loop", "fp32", steps=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, inside = _train(digits, "loop", "fp32", steps=10)
    assert inside.loss == outside.loss and inside.test_acc == outside.test_acc


# --- no call seeds the CUDA generators (issue 31, item 4) -----------------------------------------

# sha256 of conv1.weight's bytes for seed 42 on digits, computed with the code before the change
# (commit b278be0, torch.manual_seed inside fork_rng): the CPU weights must not move.
OLD_CONV1_SHA256 = {
    "kaiming": "535826ca22e80dbe7e23a944101ec35ade2b7084a70ca40cd795b79a9cc67614",
    "prewarm": "ab7510cb75b5b427b69916e675becf833fdfa9f20baf3c8a1e86296f534bad97",
}


def test_building_an_arm_seeds_only_the_cpu_generator(digits, monkeypatch):
    def refuse(name):
        def fn(*args, **kwargs):
            raise AssertionError(f"{name} was called while building an arm")
        return fn

    for name in ("manual_seed", "manual_seed_all"):
        monkeypatch.setattr(torch.cuda, name, refuse(f"torch.cuda.{name}"))
    monkeypatch.setattr(torch, "manual_seed", refuse("torch.manual_seed"))
    specs = plan_runs(SweepConfig(datasets=["digits"], seeds=[42], out=Path("unused"), steps=8,
                                  loss_points=4, eval_points=2, progress=False))
    state = torch.get_rng_state()
    for spec in specs:
        model, _ = build_arm(spec, digits)
        w = model.conv1.weight.detach().contiguous().numpy().tobytes()
        assert hashlib.sha256(w).hexdigest() == OLD_CONV1_SHA256[spec.init], spec.init
    assert torch.equal(state, torch.get_rng_state())


def test_no_source_of_the_project_seeds_the_global_generators():
    """``torch.manual_seed`` (or ``torch.cuda.manual_seed[_all]``) reseeds every CUDA device's
    generator as well; in the package, the benchmarks, the examples and the tests alike, only the
    CPU generator is seeded (``torch.default_generator.manual_seed``) or a generator of
    one's own."""
    root = Path(__file__).resolve().parents[1]
    call = re.compile(r"\btorch\.(cuda\.)?manual_seed(_all)?\(")
    hits = [f"{p.relative_to(root)}:{i}" for d in ("prewarm_gpu", "benchmarks", "examples", "tests")
            for p in sorted((root / d).rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if call.search(line.split("#")[0])]
    assert not hits, hits


# --- CUDA -----------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_fp32_on_cuda_repeats_bit_for_bit_and_differs_from_tf32():
    """cuDNN deterministic inside the trainer: two fp32 runs give the same bits; tf32 (TF32
    convolutions and matmuls) gives other bits, so "fp32" really is IEEE there."""
    from prewarm_gpu.data import load_dataset

    data = load_dataset("digits", device="cuda")
    cfg = TrainConfig(steps=30, eval_points=2, loss_points=30)

    def run(precision, backend):
        model = _model().cuda()
        res = train_batched([model], data, cfg, seeds=[42], precision=precision,
                            backend=backend)[0]
        return res, torch.cat([p.detach().flatten() for p in model.parameters()]).cpu()

    for backend in BACKENDS:
        (a, wa), (b, wb) = run("fp32", backend), run("fp32", backend)
        _, wt = run("tf32", backend)
        assert a.loss == b.loss and a.test_acc == b.test_acc and torch.equal(wa, wb), backend
        assert not torch.equal(wa, wt), f"{backend}: tf32 gave fp32's bits"
