"""`puzzle convert`: a parent as an all-parent heterogeneous child checkpoint."""

from pathlib import Path

import torch

from puzzle.errors import PuzzleError

from .checkpoint import load_model, load_tokenizer, save_model, to_puzzle


def convert(parent: Path, out: Path, dtype: str = "float32") -> Path:
    """Load a parent (HF directory, .safetensors or .gguf) and write it as an all-parent child to OUT.

    Args:
        parent: a Hugging Face model directory, a .safetensors file with config.json beside it, or a .gguf file
        out: directory to write the child checkpoint (safetensors + block_configs config.json + tokenizer)
        dtype: weight dtype of the written child (float32, bfloat16 or float16)
    """
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise PuzzleError(f"unknown dtype {dtype!r}; choose float32, bfloat16 or float16")
    parent_model = load_model(parent, dtype=torch_dtype)
    child = to_puzzle(parent_model)
    tokenizer = load_tokenizer(parent)
    save_model(child, out, tokenizer)
    n = sum(p.numel() for p in child.parameters())
    print(f"wrote {out}: {child.config.num_hidden_layers} layers, {n / 1e6:.1f}M parameters, all-parent blocks")
    return Path(out)
