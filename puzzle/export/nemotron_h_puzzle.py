"""The NemotronHPuzzle checkpoint: a NemotronH child as vLLM's `NemotronHPuzzleForCausalLM` reads it (the contract,
field by field with the function that reads it: docs/architecture.md, "NemotronHPuzzle export contract").

- config.json: NemotronH's fields (transformers' `NemotronHConfig`, the child's values: the parent's, carried
  over by conversion), `model_type` "nemotron_h_puzzle", `architectures` ["NemotronHPuzzleForCausalLM"],
  `hybrid_override_pattern` (vLLM's nemotron_h.py reads this string) beside `layers_block_type` (transformers'),
  and `block_configs`: one `{"block_type": ..., **overrides}` per layer (`puzzle_block`), read through the
  config class's `get_nemotron_h_config_for_layer`, which this export ships (nemotron_h_puzzle_code/, named in
  `auto_map`) with a modeling file that builds transformers' own NemotronH layers from each layer's config.
- weights: the hub's NemotronH names (`backbone.embeddings`, `backbone.layers.{i}.norm`, `...mixer.*` with one
  tensor per expert and `shared_experts`, `backbone.norm_f`, `lm_head.weight` always: vLLM's head is untied), the
  router's weight and `e_score_correction_bias` in float32 (transformers keeps them so:
  `_keep_in_fp32_modules_strict`).

Only what both readers build is written (`check_nemotron_h_puzzle`): one mixer per layer, Mamba2 layers of the
parent's shape (vLLM's `NemotronHMambaDecoderLayer` reads the global config), no linear sublayers.
"""

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from puzzle.errors import PuzzleError
from puzzle.io import write_safetensors
from puzzle.model.blocks import BlockConfig
from puzzle.model.checkpoint import atomic_directory, save_tokenizer
from puzzle.outputs import write_marker

ARCHITECTURE = "NemotronHPuzzleForCausalLM"
MODEL_TYPE = "nemotron_h_puzzle"
CODE_DIR = Path(__file__).parent / "nemotron_h_puzzle_code"
CODE_FILES = ("configuration_nemotron_h_puzzle.py", "modeling_nemotron_h_puzzle.py")
AUTO_MAP = {"AutoConfig": "configuration_nemotron_h_puzzle.NemotronHPuzzleConfig",
            "AutoModelForCausalLM": "modeling_nemotron_h_puzzle.NemotronHPuzzleForCausalLM"}
_PATTERN = {"mamba": "M", "attention": "*", "mlp": "-", "moe": "E"}
_LAYER_TYPES = {"mamba": "linear_attention", "attention": "full_attention", "mlp": "mlp", "moe": "moe"}
# Fields of the child's config that are puzzle's, not NemotronH's
_NOT_NEMOTRON_H = {"block_configs", "family", "sliding_windows", "auto_map", "model_type", "architectures",
                   "rope_parameters", "rope_theta", "rope_scaling", "hidden_act", "pretraining_tp", "rms_norm_eps",
                   "num_hidden_layers", "_name_or_path", "transformers_version", "dtype", "torch_dtype"}
_FP32 = re.compile(r".*\.mixer\.gate\.(weight|e_score_correction_bias)")


def block_type(block: BlockConfig) -> str:
    """"mamba" | "attention" | "mlp" | "moe": the one mixer of a NemotronH layer."""
    if block.ffn.no_op:
        return "mamba" if block.attention.is_mamba else "attention"
    return "moe" if block.ffn.is_moe else "mlp"


def check_nemotron_h_puzzle(config: Any) -> None:
    """One line for the first layer a NemotronHPuzzle checkpoint cannot describe."""
    if getattr(config, "family", None) != "nemotron_h":
        raise PuzzleError(f"nemotron-h-puzzle exports NemotronH children; this one is of family {config.family!r}")
    mamba = (config.mamba_num_heads, config.mamba_head_dim, config.ssm_state_size, config.n_groups)
    for i, block in enumerate(config.blocks):
        attention, ffn = block.attention, block.ffn
        where = f"layer {i} ({block.name}) cannot be exported as nemotron-h-puzzle"
        if attention.replace_with_linear or ffn.replace_with_linear:
            raise PuzzleError(f"{where}: NemotronH has no linear sublayer")
        if not attention.no_op and not ffn.no_op:
            raise PuzzleError(f"{where}: a NemotronH layer has exactly one mixer (Mamba2, attention, MLP or MoE)")
        m = attention.mamba
        if m is not None and (m.num_heads, m.head_dim, m.state_dim, m.num_groups) != mamba:
            raise PuzzleError(f"{where}: vLLM builds every Mamba2 layer with the parent's shape "
                              f"(NemotronHMambaDecoderLayer reads the global config)")


def kept_layers(config: Any) -> list[int]:
    """The child's layers the export writes: a layer whose two slots are both no-ops (the search dropped its one
    mixer) is the identity and is left out, the later layers renumbered."""
    return [i for i, b in enumerate(config.blocks) if not (b.attention.no_op and b.ffn.no_op)]


def puzzle_block(block: BlockConfig, config: Any) -> dict[str, Any]:
    """One layer's `block_configs` entry: its type and the NemotronH fields it sets for itself."""
    kind = block_type(block)
    entry: dict[str, Any] = {"block_type": kind}
    if kind == "attention":
        entry["num_key_value_heads"] = block.attention.num_key_value_heads(config.num_attention_heads)
    elif kind == "mlp":
        entry["intermediate_size"] = block.ffn.intermediate_size
    elif kind == "moe":
        moe = block.ffn.moe
        entry.update(n_routed_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                     moe_intermediate_size=moe.expert_size,
                     moe_shared_expert_intermediate_size=moe.shared_expert_size or 0,
                     n_shared_experts=1 if moe.shared_expert_size else 0)
    return entry


def nemotron_h_puzzle_config(config: Any, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of the export (see the module docstring)."""
    data = {k: v for k, v in config.to_dict().items() if k not in _NOT_NEMOTRON_H}
    blocks = [config.blocks[i] for i in kept_layers(config)]
    kinds = [block_type(b) for b in blocks]
    data.update(
        model_type=MODEL_TYPE, architectures=[ARCHITECTURE], auto_map=dict(AUTO_MAP),
        layers_block_type=[_LAYER_TYPES[k] for k in kinds], hybrid_override_pattern="".join(_PATTERN[k] for k in kinds),
        layer_norm_epsilon=config.rms_norm_eps, block_configs=[puzzle_block(b, config) for b in blocks],
        dtype=str(dtype).removeprefix("torch."),
    )
    return data


_LAYER = re.compile(r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm|self_attn|mlp)\.(.+)")


def hub_name(name: str, renumber: dict[int, int] | None = None) -> str:
    """A puzzle weight name as the hub's NemotronH checkpoints name it (the inverse of checkpoint.py `hybrid_key`),
    layer i written as layer renumber[i] (`kept_layers`; None: as it is)."""
    fixed = {"model.embed_tokens.weight": "backbone.embeddings.weight", "model.norm.weight": "backbone.norm_f.weight"}
    if name in fixed or name == "lm_head.weight":
        return fixed.get(name, name)
    m = _LAYER.fullmatch(name)
    if m is None:
        raise RuntimeError(f"no NemotronH name for {name}")  # a module this writer does not know: a bug
    layer, module, rest = m.groups()
    if renumber is not None:
        layer = renumber[int(layer)]
    if module.endswith("layernorm"):
        return f"backbone.layers.{layer}.norm.{rest}"
    if rest.startswith("shared_expert."):
        rest = "shared_experts." + rest[len("shared_expert."):]
    return f"backbone.layers.{layer}.mixer.{rest}"


def write_nemotron_h_puzzle(model: torch.nn.Module, tokenizer: Any, out: Path,
                            dtype: torch.dtype = torch.float32) -> Path:
    """Write a NemotronH PuzzleForCausalLM (+ tokenizer) to the directory `out` as a NemotronHPuzzle checkpoint,
    atomically."""
    config = model.config
    check_nemotron_h_puzzle(config)
    renumber = {old: new for new, old in enumerate(kept_layers(config))}
    tensors = {}
    for name, tensor in model.state_dict().items():
        if "rotary_emb" in name:
            continue
        new = hub_name(name, renumber)
        tensors[new] = tensor.float() if _FP32.fullmatch(new) else tensor.to(dtype)
    if "lm_head.weight" not in tensors:  # a tied head: vLLM's ParallelLMHead reads it by name
        tensors["lm_head.weight"] = model.get_input_embeddings().weight.to(dtype)
    out = Path(out)
    with atomic_directory(out) as tmp:
        with open(tmp / "model.safetensors", "wb") as f:
            write_safetensors(f, tensors, {"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(nemotron_h_puzzle_config(config, dtype), indent=2) + "\n")
        for name in CODE_FILES:
            shutil.copyfile(CODE_DIR / name, tmp / name)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        write_marker(tmp, "export")  # an earlier export may be replaced by the next (puzzle.outputs)
    return out
