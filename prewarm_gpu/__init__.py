"""prewarm_gpu: GPU-native Pre-Warm and the initialisations it is compared with."""

from .kmeans import MiniBatchKMeans

__all__ = ["MiniBatchKMeans"]
__version__ = "0.1.0"
