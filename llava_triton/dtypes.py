"""Torch dtypes by the names configs give them (`ServingConfig.dtype`, a checkpoint's `torch_dtype`)."""

from __future__ import annotations

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype named "float32", "float16" or "bfloat16" (a "torch." prefix allowed), or a torch dtype as is."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]
