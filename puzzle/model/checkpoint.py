"""Loading parents (HF directory, safetensors file, GGUF file) and saving children, safely and atomically."""

import contextlib
import json
import os
import re
import shutil
import struct
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_NAME

from puzzle.errors import PuzzleError
from puzzle.io import clean_stale_temps, naming, write_safetensors
from puzzle.outputs import replaceable

from . import register
from .blocks import AttentionConfig, BlockConfig, FFNConfig
from .configuration_puzzle import PuzzleConfig
from .dimensions import check_config_json, check_gguf
from .loading import INDEX_NAME, SafetensorsCheckpoint, assign_state, check_materialised, materialise_buffers, on_meta
from .family import FAMILIES, Family, MoESpec, family_of_model_type, layer_kinds
from .modeling_puzzle import PuzzleForCausalLM

register()  # AutoConfig / AutoModelForCausalLM resolve `nemotron-nas` children in this process

# The HF model_types a parent may have: one per family descriptor (family.py), and our own children.
SUPPORTED_PARENTS = tuple(t for f in FAMILIES.values() for t in f.model_types)
SUPPORTED_ARCHITECTURES = (*SUPPORTED_PARENTS, PuzzleConfig.model_type)
# relative imports of each other: every one travels with a child
_MODEL_FILES = ("blocks.py", "family.py", "configuration_puzzle.py", "mamba.py", "modeling_puzzle.py")
_AUTO_MAP = {
    "AutoConfig": "configuration_puzzle.PuzzleConfig",
    "AutoModelForCausalLM": "modeling_puzzle.PuzzleForCausalLM",
}
# The architecture engines dispatch on (vLLM, SGLang, TensorRT-LLM registries; llama.cpp's converter);
# transformers follows auto_map instead, to the modeling files the checkpoint carries.
CHILD_ARCHITECTURE = "DeciLMForCausalLM"
# Config keys that describe a checkpoint, not an architecture.
_NOT_ARCHITECTURE = {"model_type", "architectures", "transformers_version", "auto_map", "quantization_config",
                     "_name_or_path", "dtype", "torch_dtype", "pretraining_tp", "block_configs",
                     # the families' own window fields; a child's windows are its blocks' (window_length)
                     "sliding_window", "layer_types", "use_sliding_window", "max_window_layers"}


def _unsupported(model_type: str) -> PuzzleError:
    return PuzzleError(
        f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)} "
        "(dense Llama, Mistral, Qwen2/Qwen2.5 and Qwen3 decoders with SwiGLU FFNs, Qwen2-MoE, Qwen3-MoE, "
        "Mixtral, gpt-oss, the NemotronH hybrid, and puzzle children)"
    )



def family_of(config: Any) -> Family:
    """The family descriptor of a parent's or child's config; a one-line PuzzleError for anything else."""
    model_type = getattr(config, "model_type", "?")
    if model_type == PuzzleConfig.model_type:
        family = config.family_descriptor if isinstance(config, PuzzleConfig) else FAMILIES["llama"]
    else:
        family = family_of_model_type(model_type)
    if family is None:
        raise _unsupported(model_type)
    if getattr(config, "hidden_act", "silu") != "silu":
        raise PuzzleError(f"unsupported FFN activation {config.hidden_act!r}; only SwiGLU (silu) parents are supported")
    if getattr(config, "mlp_bias", False):
        raise PuzzleError("parents with MLP biases are not supported (SwiGLU FFNs without biases only)")
    if family.hybrid is not None and model_type != PuzzleConfig.model_type:
        _check_hybrid(config)
    return family


def _check_hybrid(config: Any) -> None:
    """One line for what a NemotronH parent may have that puzzle does not build yet."""
    if getattr(config, "moe_latent_size", None) is not None:
        raise PuzzleError("NemotronH parents with a latent MoE projection (moe_latent_size) are not supported yet")
    if getattr(config, "num_nextn_predict_layers", 0):
        raise PuzzleError("NemotronH parents with multi-token-prediction layers are not supported yet")
    for field in ("mamba_hidden_act", "mlp_hidden_act"):
        expected = "silu" if field == "mamba_hidden_act" else "relu2"
        if getattr(config, field, expected) != expected:
            raise PuzzleError(f"NemotronH parents with {field}={getattr(config, field)!r} are not supported "
                              f"({expected} only)")
    try:
        layer_kinds(config)
    except ValueError as err:
        raise PuzzleError(f"NemotronH config: {err}") from None


def _check_supported(config: Any) -> None:
    family_of(config)


def _split_gguf(path: Path) -> tuple[str, dict[str, str]]:
    return str(path.parent), {"gguf_file": path.name}


# What the gguf reader raises on a truncated or damaged file: struct.error when a header field is cut off,
# ValueError (numpy reshape / view) when tensor data is, IndexError / KeyError on garbage metadata.
_GGUF_ERRORS = (struct.error, ValueError, IndexError, KeyError, OSError)
try:  # what transformers' configs raise when their own checks fail (huggingface_hub strict dataclasses)
    from huggingface_hub.errors import StrictDataclassError as _INVALID_CONFIG
except ImportError:  # older huggingface_hub: the configs raise ValueError, caught as unreadable
    _INVALID_CONFIG = ()


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _bad_gguf(path: Path, err: BaseException) -> PuzzleError:
    return PuzzleError(f"{path}: not a readable GGUF file ({_first_line(err)}); is it complete? "
                       "(a truncated download or copy fails like this)")


def load_config(path: str | Path) -> Any:
    """The parent's config (any supported source), checked for support before any weight is read, its
    dimensions checked against the tensors present (`puzzle.model.dimensions`) before it is built."""
    path = Path(path)
    if not path.exists():
        raise PuzzleError(f"model path not found: {path}")
    _check_dimensions(path)
    if path.suffix == ".gguf":
        where, extra = _split_gguf(path)
        try:
            config = AutoConfig.from_pretrained(where, **extra)
        except _GGUF_ERRORS as err:
            if "model_type" in _first_line(err) or "not supported" in _first_line(err):
                raise _unsupported(_peek_model_type(path)) from None
            raise _bad_gguf(path, err) from None
        except _INVALID_CONFIG as err:
            raise _invalid_config(path, err) from None
        _check_supported(config)
        return config
    try:
        if path.suffix == ".safetensors":
            config = AutoConfig.from_pretrained(path.parent)
        elif (path / "config.json").exists():
            config = AutoConfig.from_pretrained(path)
        else:
            raise PuzzleError(f"{path}: expected a model directory with config.json, a .safetensors or a .gguf file")
    except PuzzleError:
        raise
    except _INVALID_CONFIG as err:
        raise _invalid_config(path, err) from None
    except (OSError, ValueError, KeyError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "model_type" in message or "Unrecognized model" in message or "not supported" in message:
            raise _unsupported(_peek_model_type(path)) from None
        raise PuzzleError(f"{path}: cannot read the model config ({message})") from None
    _check_supported(config)
    return config


def _check_dimensions(path: Path) -> None:
    """A supported parent's dimensions (GGUF header, config.json) against the tensors it holds, read from the
    headers alone: one line naming the field before any loop trusts a damaged number."""
    if path.suffix == ".gguf":
        try:
            check_gguf(path, SUPPORTED_PARENTS)
        except _GGUF_ERRORS as err:
            raise _bad_gguf(path, err) from None
        return
    config_json = path.parent / "config.json" if path.suffix == ".safetensors" else path / "config.json"
    try:
        raw = json.loads(config_json.read_text())
    except (OSError, ValueError):
        return  # transformers' loader names what is wrong with it
    if not isinstance(raw, dict) or raw.get("model_type") not in SUPPORTED_PARENTS:
        return  # a child is ours (its layers differ by design); anything else is refused as unsupported
    has_weights = path.suffix == ".safetensors" or any((path / n).exists() for n in (SAFE_WEIGHTS_NAME, INDEX_NAME))
    try:
        check_config_json(path, raw, path if has_weights else None)
    except (SafetensorError, OSError) as err:
        raise PuzzleError(f"{path}: cannot load the weights ({_first_line(err)}); is the checkpoint complete?") from None


def _invalid_config(path: Path, err: BaseException) -> PuzzleError:
    """transformers' own validation of a config (hidden size not a multiple of the heads, ...), in one line."""
    return PuzzleError(f"{path}: the model config is not valid ({_first_line(err.__cause__ or err)})")


def _peek_model_type(path: Path) -> str:
    cfg = path / "config.json" if path.is_dir() else path.parent / "config.json"
    try:
        return json.loads(cfg.read_text()).get("model_type", "?")
    except (OSError, ValueError):
        return "?"


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a supported parent or a puzzle child, in eval mode; never unpickles anything.

    Safetensors sources (a .safetensors file, a directory with model.safetensors or a sharded index) are
    built on the meta device and filled tensor by tensor (`puzzle.model.loading`): the weights exist once,
    nothing is randomly initialised first. A GGUF goes through transformers' own loader (dequantisation)."""
    path = Path(path)
    config = load_config(path)
    try:
        if path.suffix == ".gguf":
            where, extra = _split_gguf(path)
            # the config read above: parsing a GGUF's metadata (49K-token vocabulary included) takes seconds
            model = AutoModelForCausalLM.from_pretrained(where, config=config, dtype=dtype, **extra)
        else:
            model = on_meta(lambda: AutoModelForCausalLM.from_config(config, dtype=dtype))
            with SafetensorsCheckpoint(path) as ckpt:
                state = dequantize_mxfp4_state(ckpt.read_many(ckpt.keys(), dtype), dtype)
            if config.model_type != PuzzleConfig.model_type and family_of(config).hybrid is not None:
                state = nemotron_h_transformers_state(state, set(model.state_dict()))
            elif config.model_type != PuzzleConfig.model_type and family_of(config).moe is not None:
                state = transformers_moe_state(state, set(model.state_dict()), family_of(config).moe)  # hub -> this class
            tied = getattr(config, "tie_word_embeddings", False)
            if tied:
                state.pop("lm_head.weight", None)  # a tied head is the embedding (tie_weights below)
            assign_state(model, state, str(path), ignore_missing=lambda k: tied and k == "lm_head.weight")
            del state
            if tied:
                model.tie_weights()
            materialise_buffers(model)
            check_materialised(model, str(path))
    except PuzzleError:
        raise
    except (SafetensorError, RuntimeError) + _GGUF_ERRORS as err:
        if path.suffix == ".gguf":
            raise _bad_gguf(path, err) from None
        if not isinstance(err, (SafetensorError, OSError, ValueError, RuntimeError)):
            raise  # not a damaged safetensors checkpoint: a bug, keep its traceback
        raise PuzzleError(f"{path}: cannot load the weights ({_first_line(err)}); is the checkpoint complete?") from None
    return model.eval()


def load_puzzle(path: str | Path, dtype: torch.dtype | None = torch.float32, last_layer: int | None = None,
                checkpoint: SafetensorsCheckpoint | None = None) -> PuzzleForCausalLM:
    """A parent or child straight into a `PuzzleForCausalLM` (what `to_puzzle(load_model(path))` computes,
    holding the weights once). `dtype` None keeps the stored dtype.

    `last_layer`: a truncated model for work that never reaches the head (a BLD worker): the embeddings
    and decoder layers 0..last_layer only; `lm_head` and the final norm are None and the rest of the
    checkpoint is never read. `checkpoint`: an open reader to use (tests pass one to see what was read).
    A GGUF parent is dequantised whole by transformers first (convert it once: `puzzle convert`)."""
    path = Path(path)
    if path.suffix == ".gguf":
        model = to_puzzle(load_model(path, dtype or torch.float32))
        return model if last_layer is None else _truncate(model, last_layer)
    config = puzzle_config_from(load_config(path))
    truncated = last_layer is not None
    if truncated:
        if not 0 <= last_layer < config.num_hidden_layers:
            raise PuzzleError(f"layer {last_layer} is outside the model's {config.num_hidden_layers} layers")
        config = _truncated_config(config, last_layer)
    model = on_meta(lambda: PuzzleForCausalLM(config))
    if truncated:
        model.lm_head, model.model.norm = None, None
    wanted = set(model.state_dict())
    ckpt = checkpoint
    try:
        ckpt = ckpt or SafetensorsCheckpoint(path)
        if dtype is None:
            dtype = ckpt.dtype(next((k for k in ckpt.keys() if k.endswith("embeddings.weight")
                                     or k == "model.embed_tokens.weight"), "model.embed_tokens.weight"))
        spec = config.family_descriptor.moe
        # stored name -> ours (an MoE parent's hub names, e.g. Mixtral's block_sparse_moe or gpt-oss's router,
        # read as puzzle's; a NemotronH parent's `backbone.layers.{i}.mixer.*` as the slot its mixer takes);
        # fused experts (gpt-oss's, MXFP4-packed or not) are read whole and split below
        fused = [k for k in ckpt.keys() if _STORED_FUSED.fullmatch(k) and not _left_out(k, config, truncated)]
        if config.family_descriptor.hybrid is not None:
            slots = layer_slots(config)
            names = {k: hybrid_key(k, slots) for k in ckpt.keys()}
        else:
            names = {k: canonical_key(k, spec) for k in ckpt.keys() if not _STORED_FUSED.fullmatch(k)}
        unfused = read_unfused(ckpt, fused, spec, dtype) if fused else {}
        stray = [k for k, ours in names.items() if ours not in wanted and not _left_out(ours, config, truncated)]
        stray += [k for k in unfused if k not in wanted]
        if stray:
            raise PuzzleError(f"{path}: weights do not match the config (unexpected {stray[:3]})")
        stored = ckpt.read_many([k for k, ours in names.items() if ours in wanted], dtype)
        state = {names[k]: v for k, v in stored.items()} | unfused
        del stored, unfused
    except (SafetensorError, OSError) as err:
        raise PuzzleError(f"{path}: cannot load the weights ({_first_line(err)}); is the checkpoint complete?") from None
    finally:
        if checkpoint is None and ckpt is not None:
            ckpt.close()
    tied = config.tie_word_embeddings and not truncated
    assign_state(model, state, str(path), ignore_missing=lambda k: k == "lm_head.weight" and config.tie_word_embeddings)
    del state
    if tied:
        model.tie_weights()
    materialise_buffers(model)
    check_materialised(model, str(path))
    return model.eval()


def is_stored_fused(key: str) -> bool:
    """Whether a stored key is (part of) a fused expert parameter (gpt-oss's `mlp.experts.gate_up_proj`, its
    bias, or its MXFP4 `_blocks` / `_scales`): read whole and split by `read_unfused`."""
    return _STORED_FUSED.fullmatch(key) is not None


def read_unfused(source: Any, keys: list[str], spec: MoESpec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Stored fused expert tensors `keys` (of a reader with `read(name, dtype)`) as puzzle's per-expert tensors,
    dequantised where MXFP4-packed; one fused parameter at a time (its copy and its experts, then the next)."""
    out = {}
    for group in _fused_groups(keys):
        tensors = {k: source.read(k, dtype) for k in group}
        out |= puzzle_moe_state(dequantize_mxfp4_state(tensors, dtype), spec, contiguous=True)
    return out


def _fused_groups(keys: list[str]) -> list[list[str]]:
    """Stored fused-expert keys grouped by the parameter they make (`X` alone, or `X_blocks` with `X_scales`)."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key.removesuffix("_blocks").removesuffix("_scales"), []).append(key)
    return list(groups.values())


def _left_out(name: str, config: PuzzleConfig, truncated: bool) -> bool:
    """A stored tensor the model does not take: a tied head's copy (save_model's `lm_head_weight`) and, when
    truncated, the head, the final norm and the layers after the last one kept."""
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return True
    if not truncated:
        return False
    if name.startswith(("lm_head.", "model.norm.")):
        return True
    parts = name.split(".")
    return name.startswith("model.layers.") and parts[2].isdigit() and int(parts[2]) >= config.num_hidden_layers


def _truncated_config(config: PuzzleConfig, last_layer: int) -> PuzzleConfig:
    data = config.to_dict()
    data.update(num_hidden_layers=last_layer + 1, block_configs=data["block_configs"][: last_layer + 1])
    return PuzzleConfig(**{k: v for k, v in data.items() if k not in _NOT_ARCHITECTURE - {"block_configs"}})


def _truncate(model: PuzzleForCausalLM, last_layer: int) -> PuzzleForCausalLM:
    """`model` cut after `last_layer` (layers beyond, final norm and head dropped), in place."""
    model.config = _truncated_config(model.config, last_layer)
    model.model.config = model.config
    model.model.layers = model.model.layers[: last_layer + 1]
    model.lm_head, model.model.norm = None, None
    return model


# the input embedding's name: ours and the Llama-like families'; NemotronH's (transformers' and the hub's)
_EMBEDDING_KEYS = ("model.embed_tokens.weight", "model.embeddings.weight", "backbone.embeddings.weight")


def weights_dtype(path: str | Path) -> torch.dtype:
    """The dtype a checkpoint stores its weights in (the embedding's, read from the safetensors header); a GGUF
    is dequantised to float32. The library and children of a run are stored in their parent's dtype."""
    path = Path(path)
    if path.suffix == ".gguf":
        return torch.float32
    try:
        with SafetensorsCheckpoint(path) as ckpt:
            keys = set(ckpt.keys())
            return ckpt.dtype(next((k for k in _EMBEDDING_KEYS if k in keys), "model.embed_tokens.weight"))
    except (SafetensorError, OSError, KeyError) as err:
        raise PuzzleError(f"{path}: cannot read the weights' header ({_first_line(err)})") from None


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer stored with a model (directory, or beside a .safetensors, or inside a .gguf)."""
    path = Path(path)
    if not path.exists():
        raise PuzzleError(f"tokenizer path not found: {path}")
    try:
        if path.suffix == ".gguf":
            where, extra = _split_gguf(path)
            return AutoTokenizer.from_pretrained(where, **extra)
        return AutoTokenizer.from_pretrained(path.parent if path.is_file() else path)
    except _GGUF_ERRORS as err:
        if path.suffix == ".gguf":
            raise _bad_gguf(path, err) from None
        raise PuzzleError(f"{path}: no usable tokenizer found ({str(err).splitlines()[0]})") from None


def puzzle_config_from(config: Any) -> PuzzleConfig:
    """The PuzzleConfig of a supported parent's config (one parent block per layer, each with the layer's
    sliding window as the family reads it, and its family recorded), or a copy of a child's."""
    family = family_of(config)
    if isinstance(config, PuzzleConfig):
        return PuzzleConfig(**{k: v for k, v in config.to_dict().items() if k not in _NOT_ARCHITECTURE - {"block_configs"}})
    data = {k: v for k, v in config.to_dict().items() if k not in _NOT_ARCHITECTURE}
    if family.hybrid is not None:  # the layer layout becomes block_configs; NemotronH's names for the rest
        for key in family.hybrid.layout_fields:
            data.pop(key, None)
        blocks = family.hybrid.parent_blocks(config, family.moe)
        data.update(num_hidden_layers=len(blocks), rms_norm_eps=config.layer_norm_epsilon, family=family.name,
                    block_configs=[b.to_dict(config.hidden_size) for b in blocks])
        return PuzzleConfig(**data)
    attention = AttentionConfig(n_heads_in_group=config.num_attention_heads // config.num_key_value_heads)
    # each layer's FFN as the family reads the config (MoE or dense)
    ffns = (family.moe.parent_ffns(config) if family.moe is not None
            else [FFNConfig(intermediate_size=config.intermediate_size)] * config.num_hidden_layers)
    data.update(family=family.name, block_configs=[
        BlockConfig(attention.with_window(window), ffn).to_dict(config.hidden_size)
        for window, ffn in zip(family.layer_windows(config), ffns)])
    return PuzzleConfig(**data)


def to_puzzle(model: PreTrainedModel) -> PuzzleForCausalLM:
    """The parent as an all-parent heterogeneous child with identical weights (and so identical logits).

    The child is built on the meta device and takes the parent's tensors themselves (`assign=True`): no
    second copy, and the two share storage (training one changes the other; callers drop the parent).
    gpt-oss's experts are the exception: copied out of their interleaved columns (`puzzle_moe_state`)."""
    if isinstance(model, PuzzleForCausalLM):
        return model
    config = puzzle_config_from(model.config)
    child = on_meta(lambda: PuzzleForCausalLM(config))
    state = dict(model.state_dict())
    if config.family_descriptor.hybrid is not None:
        state = nemotron_h_puzzle_state(state, layer_slots(config))
    elif config.family_descriptor.moe is not None:
        state = puzzle_moe_state(state, config.family_descriptor.moe)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    assign_state(child, state, "parent weights do not map onto the child",
                 ignore_missing=lambda k: config.tie_word_embeddings and k == "lm_head.weight")
    if config.tie_word_embeddings:
        child.tie_weights()
    materialise_buffers(child)
    check_materialised(child, "parent weights do not map onto the child")
    return child.eval()


# An MoE expert's weights in the hub checkpoints' names (Qwen-MoE `mlp.experts.{j}.gate_proj.weight`, Mixtral
# `block_sparse_moe.experts.{j}.w1.weight`), and the 3-D parameters transformers 5 fuses them into, in the layout
# the family's `MoESpec.fused_layout` names (family.py `FusedLayout`), with gpt-oss's biases beside them.
_MIXTRAL_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_HUB_EXPERT = re.compile(r"(.*\.)block_sparse_moe\.(gate\.weight|experts\.(\d+)\.(w[123])\.weight)")
_FUSED = re.compile(r"(.*\.mlp\.experts\.)(gate_up_proj|down_proj)(_bias)?")
# fused experts as a checkpoint stores them: gpt-oss's hub files hold the weights MXFP4-packed
# one expert's tensors and the router in puzzle's names
_PER_EXPERT = re.compile(r"(.*\.mlp\.experts\.)\d+\.(gate_proj|up_proj|down_proj)\.(weight|bias)")
_ROUTER = re.compile(r"(.*\.mlp\.)gate\.(weight|bias)")
_STORED_FUSED = re.compile(r"(.*\.mlp\.experts\.)(gate_up_proj|down_proj)(_bias|_blocks|_scales)?")


def canonical_key(key: str, spec: MoESpec | None = None) -> str:
    """A checkpoint key in puzzle's names: Mixtral's hub names (block_sparse_moe, w1/w3/w2) as Qwen-MoE's
    (mlp, gate_proj/up_proj/down_proj), the router of `spec`'s family (gpt-oss `mlp.router`) as `mlp.gate`;
    every other key as it is."""
    if spec is not None and spec.router_name != "gate":
        head, dot, tail = key.rpartition(f".mlp.{spec.router_name}.")
        if dot and tail in ("weight", "bias"):
            return f"{head}.mlp.gate.{tail}"
    m = _HUB_EXPERT.fullmatch(key)
    if m is None:
        return key
    if m.group(3) is None:
        return f"{m.group(1)}mlp.gate.weight"
    return f"{m.group(1)}mlp.experts.{m.group(3)}.{_MIXTRAL_EXPERT[m.group(4)]}.weight"


def hub_key(key: str, family: str) -> str:
    """A key in puzzle's names as the family's hub checkpoints spell it (the inverse of `canonical_key`):
    Mixtral's router and experts under `block_sparse_moe` with w1 / w3 / w2; every other key as it is."""
    if family != "mixtral":
        return key
    m = re.fullmatch(r"(.*\.)mlp\.(gate\.weight|experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight)", key)
    if m is None:
        return key
    if m.group(3) is None:
        return f"{m.group(1)}block_sparse_moe.gate.weight"
    w = {v: k for k, v in _MIXTRAL_EXPERT.items()}[m.group(4)]
    return f"{m.group(1)}block_sparse_moe.experts.{m.group(3)}.{w}.weight"


def _unfuse_expert(which: str, w: torch.Tensor, layout: str, bias: bool) -> dict[str, torch.Tensor]:
    """One expert's slice of a fused parameter ((2I, D) / (D, I) in "gate_up_rows"; (D, 2I) / (I, D) and biases
    (2I,) / (D,) in "gate_up_interleaved") as its nn.Linear tensors: {"gate_proj": ..., "up_proj": ...} or
    {"down_proj": ...}, (out, in) weights, views of `w`."""
    if layout == "gate_up_rows":
        if which == "down_proj":
            return {"down_proj": w}
        gate, up = w.chunk(2, dim=0)  # transformers' `linear(x, gate_up_proj[j]).chunk(2, dim=-1)`
        return {"gate_proj": gate, "up_proj": up}
    t = w if bias else w.T  # GptOssExperts computes x @ W: W.T is nn.Linear's (out, in)
    if which == "down_proj":
        return {"down_proj": t}
    return {"gate_proj": t[0::2], "up_proj": t[1::2]}  # GptOssExperts._apply_gate: gate_up[..., ::2], [..., 1::2]


def puzzle_moe_state(state: dict[str, torch.Tensor], spec: MoESpec, contiguous: bool | None = None) -> dict[str, torch.Tensor]:
    """A parent's state dict in puzzle's layout: transformers' fused expert parameters (in `spec.fused_layout`)
    split into one SwiGLU per expert, hub names made canonical (`canonical_key`). The experts are views of the
    fused tensors (nothing copied), or each its own contiguous copy with `contiguous` (a checkpoint read from
    disk: the fused tensor is then freed). None: views where they are row blocks ("gate_up_rows"), copies of
    gpt-oss's interleaved, transposed columns (a view with no unit stride would be copied by every matmul)."""
    if contiguous is None:
        contiguous = spec.fused_layout != "gate_up_rows"
    out = {}
    for key, value in state.items():
        m = _FUSED.fullmatch(key)
        if m is None:
            out[canonical_key(key, spec)] = value
            continue
        prefix, which, bias = m.group(1), m.group(2), m.group(3) is not None
        for j, w in enumerate(value):
            for name, t in _unfuse_expert(which, w, spec.fused_layout, bias).items():
                out[f"{prefix}{j}.{name}.{'bias' if bias else 'weight'}"] = t.contiguous() if contiguous else t
    return out


def _fuse_expert(which: str, parts: dict[str, torch.Tensor], layout: str, bias: bool) -> torch.Tensor:
    """One expert's nn.Linear tensors ({"gate_proj", "up_proj"} or {"down_proj"}: (out, in) weights or (out,)
    biases) as its slice of the fused parameter in `layout`: the inverse of `_unfuse_expert`."""
    if which == "down_proj":
        w = parts["down_proj"]
        return w if layout == "gate_up_rows" or bias else w.T
    gate, up = parts["gate_proj"], parts["up_proj"]
    if layout == "gate_up_rows":
        return torch.cat([gate, up], dim=0)  # (2I, D): gate rows, then up rows
    t = torch.stack([gate, up], dim=1).reshape(2 * gate.shape[0], *gate.shape[1:])  # gate at even rows, up at odd
    return t if bias else t.T  # (D, 2I): GptOssExperts computes x @ W


def transformers_moe_state(state: dict[str, torch.Tensor], wanted: set[str],
                           spec: MoESpec | None = None) -> dict[str, torch.Tensor]:
    """An MoE state dict (puzzle's per-expert layout, or a hub checkpoint's) in the layout of the transformers
    model of `spec`'s family whose keys are `wanted`: each expert's tensors stacked into the fused 3-D
    parameters (and gpt-oss's fused biases) where that model has them, in `spec.fused_layout` (`_fuse_expert`:
    transformers 5 fuses every family; gpt-oss's hub files hold them fused already), and the router under the
    family's name (gpt-oss `mlp.router`)."""
    state = {canonical_key(k, spec): v for k, v in state.items()}
    layout = spec.fused_layout if spec is not None else "gate_up_rows"
    for key in [k for k in wanted if _FUSED.fullmatch(k)]:
        prefix, which, bias = _FUSED.fullmatch(key).groups()
        names = ("gate_proj", "up_proj") if which == "gate_up_proj" else ("down_proj",)
        suffix = "bias" if bias else "weight"
        experts = []
        while f"{prefix}{len(experts)}.{names[0]}.{suffix}" in state:
            j = len(experts)
            parts = {n: state.pop(f"{prefix}{j}.{n}.{suffix}") for n in names}
            experts.append(_fuse_expert(which, parts, layout, bias is not None))
        if experts:
            state[key] = torch.stack(experts)
    if spec is not None and spec.router_name != "gate":
        for key, m in [(k, m) for k in state if (m := _ROUTER.fullmatch(k))]:
            renamed = f"{m.group(1)}{spec.router_name}.{m.group(2)}"
            if renamed in wanted:
                state[renamed] = state.pop(key)
    return state


def hub_moe_state(state: dict[str, torch.Tensor], spec: MoESpec) -> dict[str, torch.Tensor]:
    """A state dict in puzzle's per-expert layout as the hub checkpoints of `spec`'s family hold it: where they
    hold the experts fused (`spec.hub_fused`: gpt-oss), fused in `spec.fused_layout` with the router under the
    family's name (`transformers_moe_state`); otherwise as it is."""
    if not spec.hub_fused:
        return state
    fused = {f"{m.group(1)}{'down_proj' if m.group(2) == 'down_proj' else 'gate_up_proj'}"
             f"{'_bias' if m.group(3) == 'bias' else ''}" for k in state if (m := _PER_EXPERT.fullmatch(k))}
    routers = {f"{m.group(1)}{spec.router_name}.{m.group(2)}" for k in state if (m := _ROUTER.fullmatch(k))}
    return transformers_moe_state(state, fused | routers, spec)


# NemotronH's names (transformers models/nemotron_h; the hub's `backbone.` prefix, which transformers'
# conversion_mapping.py renames to `model.`): one `norm` and one `mixer` per layer, `embeddings`, `norm_f`.
_NEMOTRON_H_LAYER = re.compile(r"(?:backbone|model)\.layers\.(\d+)\.(norm\.weight|mixer\.(.+))")
_NEMOTRON_H_FIXED = {"embeddings.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight"}
_NEMOTRON_H_FUSED = re.compile(r"model\.layers\.(\d+)\.mixer\.experts\.(up_proj|down_proj)")


def parent_names(keys: Any, config: PuzzleConfig) -> dict[str, str]:
    """A parent checkpoint's keys as {puzzle's name: stored name}: a hybrid's by `hybrid_key` (its mixer's
    slot), others by `canonical_key` (an MoE parent's hub names, the router of its family); gpt-oss's fused
    experts (MXFP4-packed or not) are left out: `read_unfused` reads them whole and splits them."""
    if config.family_descriptor.hybrid is not None:
        slots = layer_slots(config)
        return {hybrid_key(k, slots): k for k in keys}
    spec = config.family_descriptor.moe
    return {canonical_key(k, spec): k for k in keys if not is_stored_fused(k)}


def layer_slots(config: PuzzleConfig) -> list[str]:
    """Where each layer's one mixer sits in puzzle's decoder layer: "self_attn" (Mamba2, attention) or "mlp"."""
    return ["mlp" if b.attention.no_op else "self_attn" for b in config.blocks]


def hybrid_key(key: str, slots: list[str]) -> str:
    """A NemotronH checkpoint key (hub `backbone.*` or transformers' `model.*`) in puzzle's names: a layer's
    `norm` is the norm of its mixer's slot (`input_layernorm` for the attention slot, `post_attention_layernorm`
    for the FFN's), `mixer.*` that slot's module (`shared_experts` -> `shared_expert`); others as they are."""
    for prefix in ("backbone.", "model."):
        if key.startswith(prefix) and key[len(prefix):] in _NEMOTRON_H_FIXED:
            return _NEMOTRON_H_FIXED[key[len(prefix):]]
    m = _NEMOTRON_H_LAYER.fullmatch(key)
    if m is None or int(m.group(1)) >= len(slots):
        return key
    layer, slot = int(m.group(1)), slots[int(m.group(1))]
    if m.group(3) is None:
        norm = "input_layernorm" if slot == "self_attn" else "post_attention_layernorm"
        return f"model.layers.{layer}.{norm}.weight"
    rest = m.group(3)
    if rest.startswith("shared_experts."):
        rest = "shared_expert." + rest[len("shared_experts."):]
    return f"model.layers.{layer}.{slot}.{rest}"


def nemotron_h_puzzle_state(state: dict[str, torch.Tensor], slots: list[str]) -> dict[str, torch.Tensor]:
    """transformers' NemotronH state dict in puzzle's layout: names as `hybrid_key`, the fused 3-D experts
    (`mixer.experts.up_proj` (E, I, D), `down_proj` (E, D, I)) split into one relu2 MLP per expert (views)."""
    out = {}
    for key, value in state.items():
        m = _NEMOTRON_H_FUSED.fullmatch(key)
        if m is None:
            out[hybrid_key(key, slots)] = value
        else:
            out.update({f"model.layers.{m.group(1)}.mlp.experts.{j}.{m.group(2)}.weight": w for j, w in enumerate(value)})
    return out


def nemotron_h_transformers_state(state: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
    """A NemotronH hub checkpoint's state (`backbone.*`, one tensor per expert) in the layout of transformers'
    class whose keys are `wanted`: `model.*`, each layer's experts stacked into its fused 3-D parameters
    (transformers conversion_mapping.py "nemotron_h": WeightRenaming + MergeModulelist(dim=0))."""
    state = {("model." + k[len("backbone."):]) if k.startswith("backbone.") else k: v for k, v in state.items()}
    for key in [k for k in wanted if _NEMOTRON_H_FUSED.fullmatch(k)]:
        experts = []
        prefix, which = key.rsplit(".", 1)  # "model.layers.1.mixer.experts", "up_proj"
        while f"{prefix}.{len(experts)}.{which}.weight" in state:
            experts.append(state.pop(f"{prefix}.{len(experts)}.{which}.weight"))
        if experts:
            state[key] = torch.stack(experts)
    return state


def nemotron_h_class_state(state: dict[str, torch.Tensor], wanted: set[str], slots: list[str]) -> dict[str, torch.Tensor]:
    """A state dict in puzzle's layout (`nemotron_h_puzzle_state`'s output) in the layout of transformers'
    NemotronH class whose keys are `wanted` (the inverse of `nemotron_h_puzzle_state`): each key under its
    `hybrid_key` name, each layer's per-expert relu2 MLPs stacked into the fused 3-D `mixer.experts.up_proj` /
    `down_proj`. A wanted key with no source is left out (the caller's strict load names it)."""
    out = {}
    for key in wanted:
        m = _NEMOTRON_H_FUSED.fullmatch(key)
        if m is None:
            source = hybrid_key(key, slots)
            if source in state:
                out[key] = state[source]
            continue
        prefix = f"model.layers.{m.group(1)}.mlp.experts."
        experts = []
        while f"{prefix}{len(experts)}.{m.group(2)}.weight" in state:
            experts.append(state[f"{prefix}{len(experts)}.{m.group(2)}.weight"])
        if experts:
            out[key] = torch.stack(experts)
    return out


def class_state(trained: PuzzleForCausalLM, original: PreTrainedModel) -> dict[str, torch.Tensor]:
    """`trained`'s weights (the all-parent child `to_puzzle(original)` made, then trained) in the names and
    layout of `original`'s own transformers class: the inverse of `to_puzzle`'s renaming and unfusing (a
    hybrid's `nemotron_h_class_state`, an MoE family's `transformers_moe_state`; a dense family's names are
    puzzle's). Where `to_puzzle` shared storage with `original` this is a no-op on the values, but a child
    moved to another device (a GPU) or copied (gpt-oss's experts) holds the only trained copy."""
    state = trained.state_dict()
    family = trained.config.family_descriptor
    wanted = set(original.state_dict())
    if family.hybrid is not None:
        return nemotron_h_class_state(state, wanted, layer_slots(trained.config))
    if family.moe is not None:
        return transformers_moe_state(dict(state), wanted, family.moe)
    return state


# FP4 (e2m1) values by their 4-bit code: transformers integrations/mxfp4.py `FP4_VALUES`
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MXFP4-packed expert weights as transformers' GptOssExperts holds them, by the rule of transformers
    integrations/mxfp4.py `convert_moe_packed_tensors` (`_convert_moe_packed_tensors`):

      blocks (E, R, G, 16) uint8   two FP4 codes per byte, the low nibble the even element, the high the odd
      scales (E, R, G) uint8       one power-of-two exponent + 127 per group of 32 values
      ->     (E, G * 32, R)        each value FP4_VALUES[code] * 2**(scale - 127), rows and columns swapped

    (gate_up_proj_blocks (E, 2I, D/32, 16) -> gate_up_proj (E, D, 2I); down_proj_blocks (E, D, I/32, 16) ->
    down_proj (E, I, D)). One expert at a time, so the index tensors stay one expert's size."""
    if blocks.shape[:-1] != scales.shape:
        raise PuzzleError(f"MXFP4 blocks {list(blocks.shape)} do not match their scales {list(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    E, R, G, B = blocks.shape
    out = torch.empty(E, R, G, 2 * B, dtype=dtype, device=blocks.device)
    for e in range(E):
        codes = blocks[e].to(torch.uint8)
        out[e, ..., 0::2] = lut[(codes & 0x0F).long()]
        out[e, ..., 1::2] = lut[(codes >> 4).long()]
        # the scaling in float32, rounded once into `dtype` (transformers' `torch.ldexp(sub, exp, out=sub)`)
        torch.ldexp(out[e], (scales[e].to(torch.int32) - 127)[..., None], out=out[e])
    return out.view(E, R, G * 2 * B).transpose(1, 2).contiguous()


def dequantize_mxfp4_state(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`state` with each `X_blocks` / `X_scales` pair (gpt-oss's hub checkpoints) replaced by `X` dequantised
    into `dtype` (`dequantize_mxfp4`); other keys as they are."""
    out = {}
    for key, value in state.items():
        if key.endswith("_scales") and key.removesuffix("_scales") + "_blocks" in state:
            continue
        if key.endswith("_blocks") and (scales := key.removesuffix("_blocks") + "_scales") in state:
            out[key.removesuffix("_blocks")] = dequantize_mxfp4(value, state[scales], dtype)
        else:
            out[key] = value
    return out


def atomic_dir(out: Path) -> Path:
    """A fresh temporary sibling of `out`; pair with `commit_dir` so `out` is never half written. What an
    earlier, killed write of `out` left beside it (its temporary, or the old version set aside) goes first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out.parent, name=out.name)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def commit_dir(tmp: Path, out: Path) -> None:
    """Put the finished directory `tmp` at `out`. An `out` already there is replaced only when it is empty or
    an earlier output of ours (`puzzle.outputs.replaceable`): a user's directory is never deleted, whatever
    the caller checked before."""
    old = None
    if out.exists() or out.is_symlink():
        if not replaceable(out):
            raise PuzzleError(f"{out} exists and was not written by puzzle; it is left as it is: choose a new "
                              "or empty output path")
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """A temporary sibling of `out` to write the directory into (`atomic_dir`): committed over `out`
    (`commit_dir`) when the block ends, removed when it raises, so a crash leaves the old `out` or the new
    one, never half of one."""
    tmp = atomic_dir(out)
    try:
        yield tmp
        commit_dir(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise naming(err, out) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def saved_weights(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The tensors `save_pretrained` stores for `model`, the model's own (nothing copied): its state dict less
    `_keys_to_ignore_on_save` and less a tied output embedding (safetensors stores no aliases; transformers
    keeps the input embedding: modeling_utils.py `remove_tied_weights_from_state_dict`)."""
    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and embed is not None and head.weight is embed.weight:
        state.pop(next(f"{n}.weight" for n, m in model.named_modules() if m is head))
    return state


def _max_shard_bytes() -> int:
    """The file size above which this transformers' `save_pretrained` shards by default ("5GB" in 4.x,
    "50GB" in 5.x)."""
    import inspect

    from transformers.utils.hub import convert_file_size_to_int

    default = inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default
    return convert_file_size_to_int(default)


def _hub_layout(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` under the names and layout `save_pretrained` writes: transformers 5 reverts the conversions it
    applies on load (modeling_utils.py `PreTrainedModel.save_pretrained` -> core_model_loading.py
    `revert_weight_conversion`: an MoE class's fused experts back to the hub's one tensor per expert, which
    transformers 4 reads as it is); nothing to revert in 4.x or for a class without conversions (puzzle's)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x: the state dict is the hub layout
        return state
    return revert_weight_conversion(model, state)


def _write_weights(model: PreTrainedModel, directory: Path, extra: dict[str, torch.Tensor]) -> None:
    """The model's config files and weights into `directory`, as `save_pretrained` writes them. Weights that fit
    one file (`save_pretrained`'s single-file case) are streamed from the model's own tensors
    (`puzzle.io.write_safetensors`: no serialised copy), with `extra` tensors beside them; larger ones are
    sharded by `save_pretrained` itself, which cannot take `extra`."""
    weights = {**_hub_layout(model, saved_weights(model)), **extra}
    if sum(t.numel() * t.element_size() for t in weights.values()) > _max_shard_bytes():
        if extra:
            raise PuzzleError(f"writing {', '.join(extra)} into a sharded checkpoint is not supported")
        model.save_pretrained(directory, safe_serialization=True)
        _config_for_transformers_4(directory, model.config)
        return
    model.save_pretrained(directory, state_dict={})  # everything but the weights: config, generation config
    _config_for_transformers_4(directory, model.config)
    with open(directory / SAFE_WEIGHTS_NAME, "wb") as f:  # `directory` is committed whole: no temp file here
        write_safetensors(f, weights, {"format": "pt"})  # transformers' metadata for an unquantised model


def _config_for_transformers_4(directory: Path, config: Any) -> None:
    """config.json with the old names of fields transformers 5 renamed beside the new ones: 5.x maps an old
    name onto the new (`attribute_map`: Qwen3MoeConfig's `num_experts` -> `num_local_experts`), and 4.x's
    Qwen3MoeConfig reads only `num_experts` (it would build its default 128 experts). Same values; 5.x
    reads either. Nothing to add for a config without renamed fields (every dense family's, puzzle's)."""
    aliases = {old: getattr(config, new) for old, new in (getattr(type(config), "attribute_map", None) or {}).items()
               if new in config.to_dict()}
    path = directory / "config.json"
    if not aliases or not path.exists():
        return
    data = json.loads(path.read_text())
    data.update({old: value for old, value in aliases.items() if old not in data})
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_checkpoint(
    model: PreTrainedModel,
    out: str | Path,
    tokenizer: Any = None,
    extra_json: dict[str, Any] | None = None,
    extra_text: dict[str, str] | None = None,
    copy_files: tuple[Path, ...] = (),
    finish: Callable[[Path], None] | None = None,
    extra_weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write any transformers model as safetensors + config (+ tokenizer, extra JSON/text files, copied
    files) to `out` atomically: a crash leaves the old `out` or the new one, never half of one. The weights
    are streamed from the model's tensors (`_write_weights`), with `extra_weights` stored beside them.
    `finish(tmp_dir)` may rewrite what was written before the directory is committed."""
    out = Path(out)
    with atomic_directory(out) as tmp:
        _write_weights(model, tmp, extra_weights or {})
        for src in copy_files:
            shutil.copyfile(src, tmp / Path(src).name)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        if finish is not None:
            finish(tmp)
        for name, payload in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(payload, indent=2) + "\n")
        for name, text in (extra_text or {}).items():
            (tmp / name).write_text(text)
    return out


# transformers 5 names the class of a tokenizer.json-backed tokenizer "TokenizersBackend", which 4.x does
# not know; 4.x's name for the same thing is PreTrainedTokenizerFast (5.x still reads that name).
_TOKENIZER_CLASSES_4X = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def save_tokenizer(tokenizer: Any, directory: Path) -> None:
    """The tokenizer's files in `directory`, its config readable by transformers 4.x too (every checkpoint and
    export that carries a tokenizer writes it here)."""
    tokenizer.save_pretrained(directory)
    _tokenizer_config_for_transformers_4(Path(directory))


def _tokenizer_config_for_transformers_4(directory: Path) -> None:
    path = directory / "tokenizer_config.json"
    if not path.exists():
        return
    data = json.loads(path.read_text())
    if data.get("tokenizer_class") in _TOKENIZER_CLASSES_4X:
        data["tokenizer_class"] = _TOKENIZER_CLASSES_4X[data["tokenizer_class"]]
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _write_child_contract(directory: Path) -> None:
    """`architectures` as engines read it (save_pretrained writes the class name)."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["architectures"] = [CHILD_ARCHITECTURE]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_model(
    model: PuzzleForCausalLM,
    out: str | Path,
    tokenizer: Any = None,
    extra_json: dict[str, Any] | None = None,
    extra_text: dict[str, str] | None = None,
    lm_head_weight: bool = False,
) -> Path:
    """Write a child checkpoint in the Nemotron-NAS / DeciLM contract engines read: safetensors weights,
    config.json (model_type nemotron-nas, architectures DeciLMForCausalLM, block_configs, auto_map, a
    top-level rope_theta), the modeling files (so `trust_remote_code=True` needs no `puzzle`), the tokenizer
    (its config readable by transformers 4.x), extra JSON/text files. `lm_head_weight`: also store a tied
    head's weight as `lm_head.weight` (TensorRT-LLM reads it by name; see puzzle.engines)."""
    model.config.auto_map = dict(_AUTO_MAP)
    here = Path(__file__).parent
    # a tied head's weight under its own name: the embedding tensor itself, written a second time
    head = {"lm_head.weight": model.model.embed_tokens.weight} if lm_head_weight and model.config.tie_word_embeddings else {}
    return save_checkpoint(model, out, tokenizer, extra_json, extra_text, tuple(here / n for n in _MODEL_FILES),
                           finish=_write_child_contract, extra_weights=head)
