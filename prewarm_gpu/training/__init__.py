"""The trainer: the paper's protocol (§3.3) for one run or many, on one step loop.

Layered bottom-up (a module imports only those above it in this list, and the core):

- :mod:`.protocol`: :class:`TrainConfig`, :class:`TrainResult`, the schedule, the curve points
  (plain data);
- :mod:`.checkpoint`: in-run checkpoints, written atomically;
- :mod:`.step`: one step as a pure function of device tensors, and its CUDA-graph replay;
- :mod:`.grouped`, :mod:`.bmm`: the networks of the ``grouped`` and ``bmm`` backends;
- :mod:`.stacks`: one stack class per backend (R runs as one trainable object);
- :mod:`.backends`: backend names, the measured speed table, :func:`choose_backend`, the stack
  factory;
- :mod:`.curves`, :mod:`.evaluate`: the curve recorder; test accuracy;
- :mod:`.loop`: :func:`train_batched` and :func:`train`, the one loop.

The public names are re-exported by :mod:`prewarm_gpu.train`.
"""
