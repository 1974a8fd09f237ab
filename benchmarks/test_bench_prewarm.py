"""Pre-Warm: the paper's reference vs prewarm_ on CPU vs prewarm_ on CUDA; k-means alone.

Run: ``pytest benchmarks --benchmark-enable --benchmark-json=benchmarks/results/<machine>.json``,
then ``python benchmarks/summarize.py benchmarks/results/<machine>.json``. Targets (issue 11): on
the CPU no slower than before and the ratio to the reference in the same run (the old goal is
10×); on an H100/H200 at most 0.5 ms median for the colour batch. CUDA timings synchronise
inside the timed function. ``benchmarks/gpu_suite.py`` runs these and every other GPU figure in
one command.

Mini-batch k-means stops early after 12-60 steps depending on the seed, so every round (warm-up
included) uses the next seed, 0, 1, 2, ..., for every implementation alike: the medians compare
the same distribution of run lengths, not one lucky or unlucky seed per implementation.
"""

import itertools
import random

import numpy as np
import pytest
import torch
from sklearn.cluster import MiniBatchKMeans as SkMiniBatchKMeans
from torch import nn

import reference
from prewarm_gpu import MiniBatchKMeans, prewarm_
from prewarm_gpu.patches import extract_patches

CASES = {"gray": (1, 58), "color": (3, 28)}  # channels, patches per image (Table 1)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Net(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, 32, 3, padding=1)


def _batch(request, case):
    return request.getfixturevalue(f"{case}_batch")


def _rng_guard(fn):
    """The reference reseeds the global RNGs (as the paper's code); restore them after each call."""

    def wrapped():
        s = np.random.get_state(), random.getstate(), torch.get_rng_state()
        try:
            return fn()
        finally:
            np.random.set_state(s[0])
            random.setstate(s[1])
            torch.set_rng_state(s[2])

    return wrapped


@pytest.mark.parametrize("case", list(CASES))
def test_reference(benchmark, request, case):
    c, p = CASES[case]
    x = _batch(request, case)
    net = Net(c)
    benchmark.group = f"prewarm-{case}"
    benchmark.extra_info.update(impl="reference", device="cpu", shape=list(x.shape), n_patches=p)
    seeds = itertools.count()
    benchmark.pedantic(
        _rng_guard(lambda: reference.conditioned_init(net, x, n_patches=p, seed=next(seeds))),
        rounds=20, warmup_rounds=1)


@pytest.mark.parametrize("device, loop", [("cpu", "host"), ("cpu", "device"),
                                          pytest.param("cuda", "device", marks=cuda)])
@pytest.mark.parametrize("case", list(CASES))
def test_prewarm(benchmark, request, case, device, loop):
    c, p = CASES[case]
    x = _batch(request, case).to(device)
    net = Net(c).to(device)
    g = torch.Generator(device=device)
    benchmark.group = f"prewarm-{case}"
    benchmark.extra_info.update(impl=f"prewarm_ loop={loop}", device=device, shape=list(x.shape),
                                n_patches=p,
                                gpu=torch.cuda.get_device_name() if device == "cuda" else None)

    seeds, steps = itertools.count(), []

    def run():
        g.manual_seed(next(seeds))
        r = prewarm_(net, x, n_patches=p, scale=0.2, kmeans_options={"loop": loop}, generator=g)
        if device == "cuda":
            torch.cuda.synchronize()  # the write is queued after the call's last host read
        steps.append(r.kmeans_steps)
        return r

    benchmark.pedantic(run, rounds=30 if device == "cuda" else 20, warmup_rounds=1)
    benchmark.extra_info["kmeans_steps_mean"] = sum(steps) / len(steps)


@pytest.mark.parametrize("impl", ["sklearn", "torch-cpu", pytest.param("torch-cuda", marks=cuda)])
@pytest.mark.parametrize("case", list(CASES))
def test_kmeans(benchmark, request, case, impl):
    c, p = CASES[case]
    patches = extract_patches(_batch(request, case), 3, p, generator=0)
    patches = patches - patches.mean(1, keepdim=True)
    benchmark.group = f"kmeans-{case}"
    benchmark.extra_info.update(impl=impl, n=patches.shape[0], d=patches.shape[1])
    seeds, steps = itertools.count(), []
    if impl == "sklearn":
        X = patches.numpy()

        def run():
            km = SkMiniBatchKMeans(16, n_init=3, random_state=next(seeds)).fit(X)
            steps.append(km.n_steps_)
    else:
        X = patches.to("cuda" if impl == "torch-cuda" else "cpu")

        def run():
            km = MiniBatchKMeans(16, n_init=3, random_state=next(seeds)).fit(X)
            if X.is_cuda:
                torch.cuda.synchronize()
            steps.append(km.n_steps_)

    benchmark.pedantic(run, rounds=30 if impl == "torch-cuda" else 20, warmup_rounds=1)
    benchmark.extra_info["n_steps_mean"] = sum(steps) / len(steps)
