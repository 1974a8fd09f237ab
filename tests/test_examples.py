"""The examples in examples/ run, as a user runs them (a subprocess each), at tiny sizes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--steps", "2", "--image-size", "32", "--batch-size", "8"]


def run_example(name: str, timeout: float = 180.0) -> str:
    """stdout of ``python examples/<name> --steps 2 --image-size 32 --batch-size 8``; fails on a
    non-zero exit or a run past ``timeout`` (a hung rank)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        p = subprocess.run([sys.executable, str(ROOT / "examples" / name), *TINY], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name} still running after {timeout} s")
    assert p.returncode == 0, f"{name} exited with {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p.stdout


def losses(out: str) -> list[float]:
    return [float(v) for v in re.findall(r"loss (\S+)", out)]


def test_resnet18_fakedata():
    out = run_example("resnet18_fakedata.py")
    assert "Pre-Warm: conv1 filters [0, 32) from" in out and "(patch_norm)" in out
    assert len(losses(out)) == 2


def test_first_batch_hook():
    out = run_example("first_batch_hook.py")
    # Before the first loss line: the hook ran inside the first step's forward.
    assert out.index("Pre-Warm in the first forward: conv1 filters [0, 32)") < out.index("loss")
    assert len(losses(out)) == 2


def test_ddp_two_process():
    out = run_example("ddp_two_process.py")
    assert sorted(re.findall(r"rank (\d): conv1 \[0, 32\) via broadcast from rank 0", out)) == \
        ["0", "1"]
    assert "conv1 identical on all 2 ranks after 2 steps" in out
