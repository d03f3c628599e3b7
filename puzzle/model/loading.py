"""Weights loaded once: models built on the meta device, filled tensor by tensor from safetensors.

A model built under `torch.device("meta")` allocates nothing; `load_state_dict(state, assign=True)` then
makes the read tensors its parameters (no random init that is overwritten, no second copy): the rule
transformers' `from_pretrained` and accelerate's `init_empty_weights` follow. Non-persistent buffers (RoPE's
`inv_freq`) are not in a checkpoint, so they are computed again off the meta device (`materialise_buffers`,
as transformers' `PreTrainedModel._init_weights` does for every `*RotaryEmbedding`).

`SafetensorsCheckpoint` reads a single `.safetensors` file, a directory's `model.safetensors`, or a sharded
directory (`model.safetensors.index.json`), one tensor at a time with `safetensors.safe_open`; `read` keeps a
record of the names it read (BLD's tests assert a worker reads only its layers).
"""

from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors import safe_open
from torch import nn

from puzzle import dtypes
from puzzle.errors import PuzzleError
from puzzle.io import read_json

INDEX_NAME = "model.safetensors.index.json"
# safetensors' dtype names (safe_open(...).get_slice(k).get_dtype()) -> the torch dtypes a model is loaded in
_DTYPES = {dtypes.BY_NAME[n].safetensors: dtypes.torch_dtype(n) for n in dtypes.COMPUTE} | {"F64": torch.float64}


def on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` run with the meta device as torch's default: the module's structure, no storage."""
    with torch.device("meta"):
        return build()


def materialise_buffers(model: nn.Module) -> None:
    """Rebuild, on the weights' device, every module whose buffers are still on the meta device and that a
    checkpoint does not hold: rotary embeddings (a fresh `type(m)(m.config)` computes inv_freq as
    construction does)."""
    device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        if "RotaryEmbedding" not in type(module).__name__ or not hasattr(module, "config"):
            raise RuntimeError(f"{name}: a meta buffer with no rule to compute it ({type(module).__name__})")
        with torch.device(device):  # beside the weights (to_puzzle of a model on a GPU stays there)
            fresh = type(module)(config=module.config)
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attr, fresh)


def check_materialised(model: nn.Module, what: str) -> None:
    """One line when a parameter or buffer was left on the meta device (a weight the checkpoint lacks)."""
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise PuzzleError(f"{what}: weights missing from the checkpoint ({', '.join(left[:3])})")


class SafetensorsCheckpoint:
    """The tensors of a safetensors checkpoint by name, read lazily; `names_read` lists what was read."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix == ".safetensors":
            files = {None: path}
        elif (path / INDEX_NAME).exists():
            weight_map = read_json(path / INDEX_NAME).get("weight_map", {})
            files = {name: path / shard for name, shard in weight_map.items()}
        elif (path / "model.safetensors").exists():
            files = {None: path / "model.safetensors"}
        else:
            raise PuzzleError(f"{path}: no safetensors weights (model.safetensors or {INDEX_NAME})")
        self.path = path
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}
        self._where: dict[str, Path] = {}
        for name, file in files.items():
            if name is None:
                self._where.update({k: file for k in self._open(file).keys()})
            else:
                self._where[name] = file
        self.names_read: list[str] = []

    def _open(self, file: Path) -> Any:
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="pt"))
        return self._handles[file]

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of tensor `name` (read from the header, no data)."""
        code = self._open(self._where[name]).get_slice(name).get_dtype()
        return _DTYPES.get(code, torch.float32)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor `name` (read from the header, no data)."""
        return tuple(self._open(self._where[name]).get_slice(name).get_shape())

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor `name`, in `dtype` when given (a cast of a tensor already in it is the tensor itself)."""
        tensor = self._open(self._where[name]).get_tensor(name)
        self.names_read.append(name)
        return tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)

    def read_many(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return {k: self.read(k, dtype) for k in names}

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def assign_state(model: nn.Module, state: dict[str, torch.Tensor], what: str,
                 ignore_missing: Callable[[str], bool] = lambda k: False) -> None:
    """Make `state`'s tensors the model's own (`assign=True`: no copy), one line on a mismatch."""
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not ignore_missing(k)]
    if missing or unexpected:
        raise PuzzleError(f"{what}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
