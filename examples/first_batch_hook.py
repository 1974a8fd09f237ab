"""Pre-Warm a torchvision ResNet-18 on the first batch its training loop feeds it: a hook.

The loop is untouched: ``prewarm_on_first_batch`` runs Pre-Warm inside the model's first forward
call, before it. The dataset standardises its images, so the hook is given the mean and std to
undo for the rules (Table 2). Run: ``python examples/first_batch_hook.py --steps 20``.
"""

import argparse
import itertools

import torch
import torchvision
from torchvision import transforms as T

from prewarm_gpu import prewarm_on_first_batch

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--image-size", type=int, default=64)
parser.add_argument("--batch-size", type=int, default=32)
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
data = torchvision.datasets.FakeData(size=8 * args.batch_size, num_classes=10,
                                     image_size=(3, args.image_size, args.image_size),
                                     transform=T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)]))
loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True,
                                     generator=torch.Generator().manual_seed(0))
model = torchvision.models.resnet18(num_classes=10).to(device)
handle = prewarm_on_first_batch(model, mean=MEAN, std=STD, generator=0)  # the one added line

opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
for step, (x, y) in zip(range(args.steps), itertools.cycle(loader)):
    loss = torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step == 0:
        r = handle.report
        print(f"Pre-Warm in the first forward: {r.layer} filters [0, {r.n_clusters}) from "
              f"{r.n_patches} patches/image ({r.rule}), sigma {r.scale:.4f}")
    print(f"step {step + 1}/{args.steps}  loss {loss.item():.4f}")
