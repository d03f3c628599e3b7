"""GGUF tensor types and their bytes, shared by the two llama.cpp writers (llamacpp.py: deci; nemotron_h_gguf.py:
nemotron_h / nemotron_h_moe)."""

import math
from typing import Sequence

import gguf
import numpy as np
import torch

GGUF_DTYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
               "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def gguf_type(name: str, shape: Sequence[int], dtype: str) -> gguf.GGMLQuantizationType:
    """A tensor's GGUF type, from its name and shape alone: norms and 1-D tensors f32; else `dtype`, q8_0
    falling back to f16 for rows that are not whole 32-value blocks (convert_hf_to_gguf.py
    `ModelBase.prepare_tensors`, on gguf.quants' `QuantError`, raised exactly then: `can_quantize`)."""
    if dtype == "f32" or len(shape) <= 1 or name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    if dtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[q8_0][0] == 0:
        return q8_0
    return gguf.GGMLQuantizationType.F16


def gguf_nbytes(shape: Sequence[int], qtype: gguf.GGMLQuantizationType) -> int:
    """The bytes of a tensor of `shape` (elements) stored as `qtype`."""
    return math.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype))


def encode(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """A tensor's GGUF data in `qtype` (f32, f16: the values; q8_0: its blocks' bytes)."""
    return gguf.quants.quantize(tensor.detach().float().numpy(), qtype)
