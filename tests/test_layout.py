"""The layout a reader relies on: a registry that imports nothing and is complete whatever is
imported first; one integer predicate, one pair parser, one conv finder, one SimpleCNN forward."""

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from prewarm_gpu import checks
from prewarm_gpu.layers import find_conv
from prewarm_gpu.models import DSSimpleCNN, SimpleCNN
from prewarm_gpu.training.grouped import GroupedSimpleCNN

ROOT = Path(__file__).resolve().parents[1]
BUILT_IN = {"kaiming", "prewarm", "lsuv", "datadep", "lion_dg", "lsuv_lion_dg", "gabor",
            "filterbank"}


def test_the_registry_imports_only_the_standard_library():
    tree = ast.parse((ROOT / "prewarm_gpu" / "registry.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import: the registry must import nothing of ours"
            imported.add(node.module.split(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


# The library core, lowest first: each module may import only the modules listed before it.
CORE = ["checks", "_random", "patches", "rules", "layers", "filters", "kmeans_ops", "kmeans_loop",
        "kmeans_graphs", "kmeans", "prewarm_checks", "prewarm_plan", "prewarm"]


def _package_imports(path: Path) -> set[str]:
    """The prewarm_gpu modules a module of the package imports, anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prewarm_gpu."):
            names.add(node.module.split(".")[1])
    return names


def test_the_library_core_imports_only_modules_below_it():
    for i, name in enumerate(CORE):
        above = _package_imports(ROOT / "prewarm_gpu" / f"{name}.py") - set(CORE[:i])
        assert not above, f"{name}.py imports {sorted(above)}, not below it in the core"


@pytest.mark.parametrize("first", ["prewarm_gpu.registry", "prewarm_gpu.models",
                                   "prewarm_gpu.methods.lion_dg", "prewarm_gpu.experiment.plan"])
def test_the_tables_are_complete_whatever_is_imported_first(first):
    code = (f"import {first}\nfrom prewarm_gpu.registry import INITIALIZERS, MODELS\n"
            "print(sorted(INITIALIZERS)); print(sorted(MODELS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout.splitlines()
    assert BUILT_IN <= set(ast.literal_eval(out[0]))
    assert {"simplecnn", "ds-simplecnn"} <= set(ast.literal_eval(out[1]))


@pytest.mark.parametrize("v, want", [(3, True), (np.int64(3), True), (np.uint8(0), True),
                                     (True, False), (3.0, False), ("3", False), (None, False)])
def test_is_int(v, want):
    assert checks.is_int(v) is want


@pytest.mark.parametrize("v, want", [(0.5, True), (np.float32(0.5), True), (2, True),
                                     (np.int16(2), True), (False, False), (float("nan"), False),
                                     (float("inf"), False), ("1", False)])
def test_is_real(v, want):
    assert checks.is_real(v) is want


def test_as_pair():
    assert checks.as_pair(3) == (3, 3) and checks.as_pair((3, 5)) == (3, 5)
    assert checks.as_pair(np.int64(2)) == (2, 2) and checks.as_pair(np.array([1, 4])) == (1, 4)
    with pytest.raises(TypeError, match="patch_size must be an int or a pair"):
        checks.as_pair((3, 3, 3), "patch_size")
    with pytest.raises(ValueError, match=">= 1"):
        checks.as_pair(0)


def test_numpy_integers_are_integers_everywhere():
    from prewarm_gpu import rules
    from prewarm_gpu.experiment import SweepConfig, plan_runs
    from prewarm_gpu.methods.filterbank import build_bank

    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert rules.otsu_threshold(x, np.int64(64)) == rules.otsu_threshold(x, 64)
    assert len(plan_runs(SweepConfig(seeds=[np.int64(1), np.int32(2)], steps=5))) == 4
    state = SimpleCNN(1, 10, 8).state_dict()
    a = build_bank([state, state], n_clusters=np.int64(3), generator=0)
    b = build_bank([state, state], n_clusters=3, generator=0)
    assert torch.equal(a["layers"]["conv1"]["centres"], b["layers"]["conv1"]["centres"])


def test_methods_take_numpy_integers_like_python_ones():
    from prewarm_gpu.methods.datadep import datadep_
    from prewarm_gpu.methods.lsuv import lsuv_

    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for fn, opts in ((lsuv_, {"max_iter": np.int64(2)}),
                     (datadep_, {"max_rounds": np.int32(1), "max_samples": np.int64(64)})):
        a, b = (SimpleCNN(1, 10, 8) for _ in range(2))
        b.load_state_dict(a.state_dict())
        fn(a, x, generator=0, **opts)
        fn(b, x, generator=0, **{k: int(v) for k, v in opts.items()})
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), (fn.__name__, k)


def test_one_conv_finder():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3))
    assert find_conv(net)[0] == "0" and find_conv(net, 4)[0] == "2"
    assert find_conv(net, layer="2")[0] == "2"
    with pytest.raises(TypeError, match="not an nn.Conv2d"):
        find_conv(net, layer="1")
    with pytest.raises(ValueError, match="in_channels=3"):
        find_conv(net, 3)
    with pytest.raises(ValueError, match="not initialised"):
        find_conv(nn.Sequential(nn.LazyConv2d(4, 3)))


def test_simplecnn_forward_is_shared_by_its_variants(monkeypatch):
    from prewarm_gpu import models
    from prewarm_gpu.training import grouped

    calls = []

    def counted(m, x):
        calls.append(type(m).__name__)
        return models.conv_blocks.__wrapped__(m, x)

    counted.__wrapped__ = models.conv_blocks
    torch.default_generator.manual_seed(0)
    x = torch.randn(5, 1, 8, 8)
    plain, deep = SimpleCNN(1, 10, 8).eval(), DSSimpleCNN(1, 10, 8).eval()
    deep.load_state_dict({**deep.state_dict(), **plain.state_dict()})
    torch.testing.assert_close(deep(x), plain(x), rtol=0, atol=0)
    stacked = GroupedSimpleCNN([plain, plain]).eval()
    torch.testing.assert_close(stacked(torch.cat([x, x], 1))[1], plain(x), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(models, "conv_blocks", counted)  # the one definition, seen by all three
    monkeypatch.setattr(grouped, "conv_blocks", counted)
    plain(x), deep(x), stacked(torch.cat([x, x], 1))
    assert calls == ["SimpleCNN", "DSSimpleCNN", "GroupedSimpleCNN"]
