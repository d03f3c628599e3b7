"""`puzzle convert`: a parent as an all-parent heterogeneous child checkpoint."""

from pathlib import Path

from puzzle import dtypes
from puzzle.outputs import check_output, marker

from .checkpoint import load_model, load_tokenizer, save_model, to_puzzle


def convert(parent: Path, out: Path, dtype: str = "fp32", force: bool = False) -> Path:
    """Load a parent (HF directory, .safetensors or .gguf) and write it as an all-parent child to OUT.

    Args:
        parent: a Hugging Face model directory, a .safetensors file with config.json beside it, or a .gguf file
        out: directory to write the child checkpoint (safetensors + block_configs config.json + tokenizer)
        dtype: weight dtype of the written child: fp32, bf16 or fp16 (or torch's name: float32, ...)
        force: replace an earlier output of another puzzle command at OUT (never anything else)
    """
    torch_dtype = dtypes.torch_dtype(dtypes.canonical(dtype, dtypes.COMPUTE))
    check_output(Path(out), "convert", force=force, inputs=(parent,))
    parent_model = load_model(parent, dtype=torch_dtype)
    child = to_puzzle(parent_model)
    tokenizer = load_tokenizer(parent)
    save_model(child, out, tokenizer, extra_json=marker("convert"))
    n = sum(p.numel() for p in child.parameters())
    print(f"wrote {out}: {child.config.num_hidden_layers} layers, {n / 1e6:.1f}M parameters, all-parent blocks")
    return Path(out)
