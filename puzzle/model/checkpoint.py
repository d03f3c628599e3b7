"""Loading parents (HF directory, safetensors file, GGUF file) and saving children, safely and atomically."""

import json
import os
import shutil
import struct
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from puzzle.errors import PuzzleError

from . import register
from .configuration_puzzle import PuzzleConfig
from .modeling_puzzle import PuzzleForCausalLM

register()  # AutoConfig / AutoModelForCausalLM resolve `puzzle_llama` children in this process

# model_type -> why it is (or is not) a Llama-family parent we can express as blocks.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "puzzle_llama")
_MODEL_FILES = ("blocks.py", "configuration_puzzle.py", "modeling_puzzle.py")  # relative imports of each other
_AUTO_MAP = {
    "AutoConfig": "configuration_puzzle.PuzzleConfig",
    "AutoModelForCausalLM": "modeling_puzzle.PuzzleForCausalLM",
}
# Config keys that describe a checkpoint, not an architecture.
_NOT_ARCHITECTURE = {"model_type", "architectures", "transformers_version", "auto_map", "quantization_config",
                     "_name_or_path", "dtype", "torch_dtype", "pretraining_tp", "sliding_window", "block_configs"}


def _unsupported(model_type: str) -> PuzzleError:
    return PuzzleError(
        f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)} "
        "(Llama-family decoders with SwiGLU FFNs and no attention biases)"
    )


def _check_supported(config: Any) -> None:
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise _unsupported(model_type)
    if model_type == "mistral" and getattr(config, "sliding_window", None):
        if config.sliding_window < config.max_position_embeddings:
            raise PuzzleError("mistral parents with a sliding window shorter than the context are not supported")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise PuzzleError(f"unsupported FFN activation {config.hidden_act!r}; only SwiGLU (silu) parents are supported")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise PuzzleError("parents with attention or MLP biases are not supported")


def _split_gguf(path: Path) -> tuple[str, dict[str, str]]:
    return str(path.parent), {"gguf_file": path.name}


# What the gguf reader raises on a truncated or damaged file: struct.error when a header field is cut off,
# ValueError (numpy reshape / view) when tensor data is, IndexError / KeyError on garbage metadata.
_GGUF_ERRORS = (struct.error, ValueError, IndexError, KeyError, OSError)


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _bad_gguf(path: Path, err: BaseException) -> PuzzleError:
    return PuzzleError(f"{path}: not a readable GGUF file ({_first_line(err)}); is it complete? "
                       "(a truncated download or copy fails like this)")


def load_config(path: str | Path) -> Any:
    """The parent's config (any supported source), checked for support before any weight is read."""
    path = Path(path)
    if not path.exists():
        raise PuzzleError(f"model path not found: {path}")
    if path.suffix == ".gguf":
        where, extra = _split_gguf(path)
        try:
            config = AutoConfig.from_pretrained(where, **extra)
        except _GGUF_ERRORS as err:
            if "model_type" in _first_line(err) or "not supported" in _first_line(err):
                raise _unsupported(_peek_model_type(path)) from None
            raise _bad_gguf(path, err) from None
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
    except (OSError, ValueError, KeyError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "model_type" in message or "Unrecognized model" in message or "not supported" in message:
            raise _unsupported(_peek_model_type(path)) from None
        raise PuzzleError(f"{path}: cannot read the model config ({message})") from None
    _check_supported(config)
    return config


def _peek_model_type(path: Path) -> str:
    cfg = path / "config.json" if path.is_dir() else path.parent / "config.json"
    try:
        return json.loads(cfg.read_text()).get("model_type", "?")
    except (OSError, ValueError):
        return "?"


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a supported parent or a puzzle child, in eval mode; never unpickles anything."""
    path = Path(path)
    config = load_config(path)
    try:
        if path.suffix == ".gguf":
            where, extra = _split_gguf(path)
            # the config read above: parsing a GGUF's metadata (49K-token vocabulary included) takes seconds
            model = AutoModelForCausalLM.from_pretrained(where, config=config, dtype=dtype, **extra)
        elif path.suffix == ".safetensors":
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            state = load_file(str(path))
            if getattr(config, "tie_word_embeddings", False):
                state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))
            missing, unexpected = model.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
            if missing or unexpected:
                raise PuzzleError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    except PuzzleError:
        raise
    except (SafetensorError, RuntimeError) + _GGUF_ERRORS as err:
        if path.suffix == ".gguf":
            raise _bad_gguf(path, err) from None
        if not isinstance(err, (SafetensorError, OSError, ValueError, RuntimeError)):
            raise  # not a damaged safetensors checkpoint: a bug, keep its traceback
        raise PuzzleError(f"{path}: cannot load the weights ({_first_line(err)}); is the checkpoint complete?") from None
    return model.eval()


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
    """The all-parent PuzzleConfig of a Llama-family config: one parent block per layer."""
    _check_supported(config)
    if isinstance(config, PuzzleConfig):
        return PuzzleConfig(**{k: v for k, v in config.to_dict().items() if k not in _NOT_ARCHITECTURE - {"block_configs"}})
    data = {k: v for k, v in config.to_dict().items() if k not in _NOT_ARCHITECTURE}
    return PuzzleConfig(**data)


def to_puzzle(model: PreTrainedModel) -> PuzzleForCausalLM:
    """The parent as an all-parent heterogeneous child with identical weights (and so identical logits)."""
    if isinstance(model, PuzzleForCausalLM):
        return model
    config = puzzle_config_from(model.config)
    child = PuzzleForCausalLM(config).to(next(model.parameters()).dtype)
    state = model.state_dict()
    missing, unexpected = child.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise PuzzleError(f"parent weights do not map onto the child (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        child.tie_weights()
    return child.eval()


def atomic_dir(out: Path) -> Path:
    """A fresh temporary sibling of `out`; pair with `commit_dir` so `out` is never half written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def commit_dir(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    model: PreTrainedModel,
    out: str | Path,
    tokenizer: Any = None,
    extra_json: dict[str, Any] | None = None,
    extra_text: dict[str, str] | None = None,
    copy_files: tuple[Path, ...] = (),
) -> Path:
    """Write any transformers model as safetensors + config (+ tokenizer, extra JSON/text files, copied
    files) to `out` atomically: a crash leaves the old `out` or the new one, never half of one."""
    out = Path(out)
    tmp = atomic_dir(out)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        for src in copy_files:
            shutil.copyfile(src, tmp / Path(src).name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, payload in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(payload, indent=2) + "\n")
        for name, text in (extra_text or {}).items():
            (tmp / name).write_text(text)
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_model(
    model: PuzzleForCausalLM,
    out: str | Path,
    tokenizer: Any = None,
    extra_json: dict[str, Any] | None = None,
    extra_text: dict[str, str] | None = None,
) -> Path:
    """Write a child checkpoint: safetensors weights, config.json with block_configs and auto_map,
    the modeling files (so `trust_remote_code=True` needs no `puzzle`), the tokenizer, extra JSON/text files."""
    model.config.auto_map = dict(_AUTO_MAP)
    model.config.architectures = ["PuzzleForCausalLM"]
    here = Path(__file__).parent
    return save_checkpoint(model, out, tokenizer, extra_json, extra_text, tuple(here / n for n in _MODEL_FILES))
