"""prewarm_gpu: GPU-native Pre-Warm and the initialisations it is compared with.

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026). ``prewarm_(model, images)`` conditions half the first conv's filters on k-means centroids of
mean-centred patches of one batch, on the images' device.
"""

__version__ = "0.1.0"

from . import rules  # noqa: E402
from .distributed import DistributedPrewarmReport, prewarm_distributed_
from .hooks import prewarm_on_first_batch
from .kmeans import MiniBatchKMeans
from .prewarm import PrewarmReport, conditioned_init, prewarm_

# Every built-in initialiser and architecture registered (prewarm_gpu.registry), whatever module a
# user imports first: importing any prewarm_gpu module runs this file first.
from . import initializers, methods, models  # noqa: E402,F401  isort: skip

__all__ = ["DistributedPrewarmReport", "MiniBatchKMeans", "PrewarmReport", "conditioned_init",
           "prewarm_", "prewarm_distributed_", "prewarm_on_first_batch", "rules"]
