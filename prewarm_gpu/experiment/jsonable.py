"""Plain JSON for records and summaries (the one conversion every output file goes through)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def jsonable(x: Any) -> Any:
    """Plain JSON: tensors and arrays → lists (large ones → a shape summary), NaN/Inf → None."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (torch.Tensor, np.ndarray)):
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
        if arr.size > 1024:
            return {"shape": list(arr.shape), "dtype": str(arr.dtype)}
        return jsonable(arr.tolist())
    if isinstance(x, np.generic):
        return jsonable(x.item())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)
