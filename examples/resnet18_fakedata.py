"""Pre-Warm a torchvision ResNet-18's conv1 from one batch, then train it in a plain loop.

Data: torchvision's FakeData (random images, no download). The loader yields raw [0, 1] pixels;
the loop standardises them, and Pre-Warm's rules (Table 2) get the raw batch beside the
standardised one. Run: ``python examples/resnet18_fakedata.py --steps 20``.
"""

import argparse
import itertools

import torch
import torchvision
from torchvision import transforms as T

from prewarm_gpu import prewarm_

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--image-size", type=int, default=64)
parser.add_argument("--batch-size", type=int, default=32)
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
data = torchvision.datasets.FakeData(size=8 * args.batch_size, num_classes=10,
                                     image_size=(3, args.image_size, args.image_size),
                                     transform=T.ToTensor())
loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True,
                                     generator=torch.Generator().manual_seed(0))
normalize = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
model = torchvision.models.resnet18(num_classes=10).to(device)

raw, _ = next(iter(loader))  # one batch, raw [0, 1] pixels
raw = raw.to(device)
report = prewarm_(model, normalize(raw), raw_images=raw, generator=0)  # the one added line
print(f"Pre-Warm: {report.layer} filters [0, {report.n_clusters}) from {report.n_patches} "
      f"patches/image ({report.rule}), sigma {report.scale:.4f}, {report.seconds:.2f} s")

opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
for step, (x, y) in zip(range(args.steps), itertools.cycle(loader)):
    loss = torch.nn.functional.cross_entropy(model(normalize(x.to(device))), y.to(device))
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step + 1}/{args.steps}  loss {loss.item():.4f}")
