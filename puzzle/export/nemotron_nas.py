"""The Nemotron-NAS / DeciLM safetensors checkpoint that vLLM, SGLang, TensorRT-LLM and transformers load.

- config.json: model_type "nemotron-nas" and architectures ["DeciLMForCausalLM"] (the names the engines
  register their loaders under: vLLM `vllm/model_executor/models/nemotron_nas.py` `DeciLMForCausalLM`),
  `block_configs` with `ffn_mult` per FFN (vLLM `_ffn_mult_to_intermediate_size`, TensorRT-LLM and SGLang
  derive the width from it, so every width must lie on that grid), a top-level `rope_theta` and `rope_scaling`
  (what those loaders and transformers 4.x read) beside transformers 5's `rope_parameters`. Every field is set
  here explicitly, whatever the child's own config class writes.
- model.safetensors: the child's weights under DeciLM's names (the child's are those: `self_attn.linear_attn`,
  `mlp.linear_mlp` for linear sublayers, nothing for no-op ones), with `lm_head.weight` written even for tied
  embeddings (a loader that reads the head finds it; one that ties skips it).
- The child's modeling files and `auto_map`, so `AutoModelForCausalLM.from_pretrained(dir,
  trust_remote_code=True)` loads it without `puzzle`; the tokenizer files.
"""

import json
import shutil
from pathlib import Path
from typing import Any

import torch

import puzzle.model
from puzzle.errors import PuzzleError
from puzzle.io import write_safetensors
from puzzle.model.blocks import BlockConfig, ffn_mult_to_intermediate_size
from puzzle.model.checkpoint import _AUTO_MAP, _MODEL_FILES, atomic_directory, save_tokenizer
from puzzle.outputs import write_marker

from .fields import rope

MODEL_TYPE = "nemotron-nas"
ARCHITECTURES = ["DeciLMForCausalLM"]


def check_ffn_grid(blocks: list[BlockConfig], hidden_size: int) -> None:
    """Refuse the first SwiGLU width that `ffn_mult` cannot express: engines rebuild each width as
    int(2 * ffn_mult * hidden / 3) rounded up to a multiple of 256 (blocks.ffn_mult_to_intermediate_size)."""
    for i, block in enumerate(blocks):
        if not block.ffn.is_swiglu:
            continue
        mult = block.ffn.to_dict(hidden_size)["ffn_mult"]
        if ffn_mult_to_intermediate_size(mult, hidden_size) != block.ffn.intermediate_size:
            raise PuzzleError(
                f"layer {i} ({block.name}) cannot be exported as nemotron-nas: FFN width "
                f"{block.ffn.intermediate_size} is off the ffn_mult grid engines derive widths from "
                "(int(2 * ffn_mult * hidden / 3) rounded up to a multiple of 256)"
            )


def nemotron_nas_config(config: Any, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of the export: the child's config with the engine-facing fields set explicitly."""
    theta, scaling = rope(config)
    data = config.to_dict()
    data.update(
        model_type=MODEL_TYPE,
        architectures=list(ARCHITECTURES),
        auto_map=dict(_AUTO_MAP),
        block_configs=[b.to_dict(config.hidden_size) for b in config.blocks],
        rope_theta=theta,
        rope_scaling=scaling,
        dtype=str(dtype).removeprefix("torch."),
        torch_dtype=str(dtype).removeprefix("torch."),  # transformers 4.x's name for it
    )
    return data


def nemotron_nas_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights to write, the model's own tensors (converted one at a time as they are written):
    lm_head.weight written even when tied (the embedding tensor, stored a second time)."""
    state = {k: v for k, v in model.state_dict().items() if "rotary_emb" not in k}
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def write_nemotron_nas(model: torch.nn.Module, tokenizer: Any, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write a PuzzleForCausalLM (+ tokenizer) to the directory `out` as a Nemotron-NAS checkpoint, atomically."""
    config = model.config
    check_ffn_grid(config.blocks, config.hidden_size)
    out = Path(out)
    with atomic_directory(out) as tmp:
        with open(tmp / "model.safetensors", "wb") as f:  # streamed: no second copy of the weights
            write_safetensors(f, nemotron_nas_state(model), {"format": "pt"}, dtype=dtype)
        (tmp / "config.json").write_text(json.dumps(nemotron_nas_config(config, dtype), indent=2) + "\n")
        for name in _MODEL_FILES:  # the modeling code travels with the checkpoint
            shutil.copyfile(Path(puzzle.model.__file__).parent / name, tmp / name)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        write_marker(tmp, "export")  # an earlier export may be replaced by the next (puzzle.outputs)
    return out
