"""benchmarks/bench_training.py's device handling (issue 31, item 7)."""

import pytest
import torch

from benchmarks.bench_training import is_cuda


@pytest.mark.parametrize("device, cuda", [
    ("cuda", True), ("cuda:0", True), ("cuda:1", True), (torch.device("cuda", 0), True),
    ("cpu", False), (torch.device("cpu"), False), ("meta", False),
])
def test_is_cuda_compares_the_device_type_not_the_string(device, cuda):
    """``--device cuda:0`` must synchronise too; a string comparison with "cuda" did not."""
    assert is_cuda(device) is cuda


def test_is_cuda_refuses_a_non_device():
    with pytest.raises(RuntimeError, match="device"):
        is_cuda("gpu0")
