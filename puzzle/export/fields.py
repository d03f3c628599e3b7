"""Config facts the export formats share: RoPE as engines read it, and the weight dtypes a format takes."""

from typing import Any

import torch

from puzzle import dtypes
from puzzle.errors import PuzzleError

# Safetensors formats write these dtypes (puzzle/dtypes.py names and aliases; "auto": as the child is stored).
SAFETENSORS_DTYPES = dtypes.COMPUTE


def rope(config: Any) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) of a Llama-family config, whichever transformers wrote it.

    transformers 5 keeps both in `rope_parameters` ({"rope_type": "default", "rope_theta": 1e4, ...});
    4.x and the engines (vLLM nemotron_nas.py, llama.cpp's DeciModel) read a top-level `rope_theta` and a
    `rope_scaling` dict that is null for plain RoPE.
    """
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = getattr(config, "rope_theta", None)
    if theta is None:
        raise PuzzleError("the model config has no rope_theta (nor rope_parameters.rope_theta)")
    scaling = params or dict(getattr(config, "rope_scaling", None) or {})
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return float(theta), None
    return float(theta), scaling


def safetensors_dtype(dtype: str, stored: Any) -> torch.dtype:
    """The torch dtype to write: `dtype` by name, or the checkpoint's own with "auto" (float32 if unknown)."""
    if dtype == "auto":
        if isinstance(stored, torch.dtype):
            return stored
        name = dtypes.name_of(stored or "float32")
        return dtypes.torch_dtype(name) if name in SAFETENSORS_DTYPES else torch.float32
    return dtypes.torch_dtype(dtypes.canonical(dtype, SAFETENSORS_DTYPES, extra=("auto",)))
