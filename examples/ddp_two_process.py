"""Two-process DDP on the CPU (gloo): every rank trains rank 0's Pre-Warm filters.

Each rank draws its own batches, and DDP broadcasts parameters only when it is built, so a plain
``prewarm_`` after wrapping would leave each rank its own conv1. ``prewarm_distributed_`` computes
on rank 0 and broadcasts the conditioned filters. Ends by checking conv1 is identical on every rank.
Run: ``python examples/ddp_two_process.py --steps 5`` (torch.multiprocessing, one machine).
"""

import argparse
import itertools
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision import transforms as T

from prewarm_gpu import prewarm_distributed_

WORLD = 2


def main(rank: int, args, rendezvous: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=WORLD)
    data = torchvision.datasets.FakeData(size=4 * args.batch_size, num_classes=10,
                                         image_size=(3, args.image_size, args.image_size),
                                         transform=T.ToTensor(), random_offset=1000 * rank)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size)  # each rank its own
    normalize = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    model = DDP(torchvision.models.resnet18(num_classes=10))

    raw, _ = next(iter(loader))
    report = prewarm_distributed_(model, normalize(raw), raw_images=raw, generator=0)
    print(f"rank {rank}: {report.layer} [0, {report.n_clusters}) via {report.sync} from rank "
          f"{report.src}")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _, (x, y) in zip(range(args.steps), itertools.cycle(loader)):
        loss = torch.nn.functional.cross_entropy(model(normalize(x)), y)
        opt.zero_grad()
        loss.backward()  # DDP averages the gradients: equal weights stay equal
        opt.step()
    w = model.module.conv1.weight.detach()
    every = [torch.empty_like(w) for _ in range(WORLD)]
    dist.all_gather(every, w)
    assert all(torch.equal(w, other) for other in every), "conv1 differs between ranks"
    if rank == 0:
        print(f"conv1 identical on all {WORLD} ranks after {args.steps} steps")
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    # A file rendezvous: one machine, no port to pick, and no TCP store listening on every
    # interface (as tcp:// would); gloo then connects the ranks over the loopback.
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(main, args=(args, os.path.join(tmp, "rendezvous")), nprocs=WORLD)
