"""The one dtype vocabulary and table, torch-free (the planner and the CLI read it without importing torch).

    name   bytes  torch            safetensors  GGUF   also accepted
    fp32   4      float32          F32          f32    float, f32
    bf16   2      bfloat16         BF16         bf16
    fp16   2      float16          F16          f16    half, f16
    fp8    1      float8_e4m3fn    F8_E4M3      -

Every `--dtype` of every stage (and a hardware profile's workload dtype) is one of these names; torch's own
names and the short file-format spellings are accepted as aliases everywhere (`canonical`). Which names a
given use accepts is its own rule: training and inference compute in fp32, bf16 or fp16 (`COMPUTE`,
puzzle.device), a hardware profile may also price fp8, the GGUF export writes fp32, fp16 or q8_0 (a
quantisation, not a dtype of this table).
The torch dtype is looked up only when asked for (`torch_dtype`).
"""

from dataclasses import dataclass
from typing import Any, Iterable

from puzzle.errors import PuzzleError


@dataclass(frozen=True)
class DType:
    name: str  # the vocabulary's name
    bytes: int  # per element
    torch: str  # torch's attribute name (torch.float32)
    safetensors: str  # the safetensors header's dtype code
    gguf: str | None  # llama.cpp's name for it (convert_hf_to_gguf.py --outtype), None: no GGUF type
    aliases: tuple[str, ...] = ()  # other spellings accepted for it (beside `torch`)


TABLE: tuple[DType, ...] = (
    DType("fp32", 4, "float32", "F32", "f32", ("float", "f32")),
    DType("bf16", 2, "bfloat16", "BF16", "bf16"),
    DType("fp16", 2, "float16", "F16", "f16", ("half", "f16")),
    DType("fp8", 1, "float8_e4m3fn", "F8_E4M3", None),
)
BY_NAME: dict[str, DType] = {d.name: d for d in TABLE}
NAMES: tuple[str, ...] = tuple(BY_NAME)
BYTES: dict[str, int] = {d.name: d.bytes for d in TABLE}
COMPUTE: tuple[str, ...] = ("fp32", "bf16", "fp16")  # what eager PyTorch trains and runs in
_SPELLINGS: dict[str, str] = {s: d.name for d in TABLE for s in (d.name, d.torch, *d.aliases)}


def canonical(dtype: str, allowed: Iterable[str] = NAMES, extra: Iterable[str] = ()) -> str:
    """The vocabulary's name for `dtype` ("bfloat16", "torch.bfloat16", "BF16" -> "bf16"); one PuzzleError
    line unless it is one of `allowed`. `extra`: other words the caller takes as they are (e.g. "auto")."""
    word = str(dtype).strip().lower().removeprefix("torch.")
    extra, allowed = tuple(extra), tuple(allowed)
    if word in extra:
        return word
    name = _SPELLINGS.get(word)
    if name not in allowed:
        choices = ", ".join((*extra, *allowed))
        raise PuzzleError(f"unknown dtype {dtype!r}; choose {choices} (torch's names, e.g. bfloat16, work too)")
    return name


def name_of(dtype: Any) -> str | None:
    """The vocabulary's name of a torch dtype, or of a config's dtype string ("bfloat16",
    "torch.float16"); None when it has none."""
    return _SPELLINGS.get(str(dtype).strip().lower().removeprefix("torch."))


def torch_dtype(dtype: str) -> Any:
    """The torch dtype of a name of the vocabulary (or an alias); imports torch."""
    import torch

    return getattr(torch, BY_NAME[canonical(dtype)].torch)
