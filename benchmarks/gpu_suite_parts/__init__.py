"""The parts of ``benchmarks/gpu_suite.py`` (its entry point and command line): ``core`` (the
budget, the JSON, a case's isolation), ``smoke``, ``measure`` (tests, prewarm, kmeans),
``training``, and ``summary``."""
