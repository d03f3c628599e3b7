"""Where a stage computes and in which precision: one resolver for every stage's `--device` and `--dtype`.

    device  auto | cpu | cuda | cuda:N     auto: the first CUDA GPU when one is visible, else the CPU
    dtype   auto | bf16 | fp16 | fp32      auto: bf16 on CUDA (fp16 on a GPU without bf16), fp32 on the CPU
                                          (torch's names, bfloat16 / float16 / float32, too: puzzle/dtypes.py)

Inference stages (importance, score, evaluate, realize) hold the model in the resolved dtype. Training
stages (BLD, GKD) keep their trainable weights and AdamW state in fp32 and run the forward under
`torch.autocast` in the resolved dtype (`Runtime.autocast`); what they only read (the BLD parent, the GKD
teacher) is held once in the resolved dtype. On the CPU with `auto` every stage computes exactly what it
did before these flags existed: fp32, no autocast, and `Runtime.settings()` adds nothing to any cache key.

After torchtune's `utils.get_device` (torchtune/utils/_device.py) and `training.get_dtype`
(torchtune/training/precision.py): a user's mistake (cuda without a GPU, an unknown name, bf16 where the
GPU has none) is one `PuzzleError` line, not a traceback from deep inside a stage.
"""

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
from torch import nn

from puzzle import dtypes
from puzzle.errors import PuzzleError

# the dtypes a stage computes in (puzzle/dtypes.py: the vocabulary, torch's names accepted as aliases)
DTYPES: dict[str, torch.dtype] = {name: dtypes.torch_dtype(name) for name in dtypes.COMPUTE}
DEVICE_HELP = "auto, cpu, cuda or cuda:N"


@dataclass(frozen=True)
class Runtime:
    """A resolved (device, dtype) pair; `dtype_name` is its short name (fp32, bf16, fp16)."""

    device: torch.device
    dtype_name: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def mixed(self) -> bool:
        """Whether training runs under autocast (fp32 master weights, low-precision matmuls)."""
        return self.dtype != torch.float32

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> ContextManager[Any]:
        """torch.autocast in the resolved dtype for a mixed run; a no-op context for fp32."""
        if not self.mixed:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> "torch.amp.GradScaler":
        """Loss scaling where fp16 gradients would underflow (fp16 on CUDA); a pass-through otherwise
        (bf16 has fp32's exponent range; torch's own AMP recipe scales fp16 only)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.is_cuda and self.dtype == torch.float16)

    def adamw_kwargs(self) -> dict[str, Any]:
        """AdamW's implementation: the fused CUDA kernel on a GPU, foreach on the CPU (today's)."""
        return {"fused": True} if self.is_cuda else {"foreach": True}

    def settings(self) -> dict[str, str]:
        """What a resumable stage adds to its settings' key: nothing for fp32 (so caches written before
        these flags stay valid), the dtype otherwise (bf16 results differ beyond float rounding). The device
        is left out on purpose: like threads and workers, it changes results only by rounding."""
        return {} if not self.mixed else {"dtype": self.dtype_name}

    def __str__(self) -> str:
        return f"{self.device} {self.dtype_name}"


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` -> cuda when a GPU is visible, else cpu; `cuda[:N]` checked against the visible GPUs."""
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        index = name.partition(":")[2]
        if index and not index.isdigit():
            raise PuzzleError(f"unknown device {device!r}; choose {DEVICE_HELP}")
        if not torch.cuda.is_available():
            raise PuzzleError(f"--device {device}: no CUDA GPU is visible here; use --device cpu (or auto)")
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise PuzzleError(f"--device {device}: only {count} CUDA GPU(s) are visible (cuda:0..cuda:{count - 1})")
        return torch.device("cuda", int(index) if index else torch.cuda.current_device())
    raise PuzzleError(f"unknown device {device!r}; choose {DEVICE_HELP}")


def resolve_dtype(dtype: str = "auto", device: torch.device | str = "cpu") -> str:
    """The short dtype name for `dtype` on `device` (auto: bf16 on CUDA, fp32 on the CPU)."""
    device = torch.device(device)
    name = dtypes.canonical(dtype, dtypes.COMPUTE, extra=("auto",))
    if name == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PuzzleError(f"--dtype bf16: {torch.cuda.get_device_name(device)} has no bf16; use --dtype fp16")
    return name


def resolve(device: str = "auto", dtype: str = "auto") -> Runtime:
    """Every stage's one call: the `--device` and `--dtype` flags -> a Runtime (PuzzleError on a mistake)."""
    where = resolve_device(device)
    return Runtime(where, resolve_dtype(dtype, where))


def resolve_remote(device: str = "auto", dtype: str = "auto") -> Runtime:
    """For work that runs on other machines (Ray workers, whose GPUs this driver may lack): the names are
    checked here and nothing is looked up. `cuda[:N]` -> a CUDA Runtime, `cpu` / `auto` -> a CPU one (each
    worker takes the device Ray gave it); dtype auto is bf16 for a CUDA request, fp32 otherwise, so every
    worker computes in the one dtype the driver records."""
    name = str(device).strip().lower()
    index = name.partition(":")[2]
    if name not in ("auto", "cpu", "cuda") and not (name.startswith("cuda:") and index.isdigit()):
        raise PuzzleError(f"unknown device {device!r}; choose {DEVICE_HELP}")
    where = torch.device("cuda" if name.startswith("cuda") else "cpu")
    low = dtypes.canonical(dtype, dtypes.COMPUTE, extra=("auto",))
    if low == "auto":
        low = "bf16" if where.type == "cuda" else "fp32"
    return Runtime(where, low)


def place(model: nn.Module, device: torch.device | str, dtype: torch.dtype | None = None) -> nn.Module:
    """`model` on `device` with its floating parameters in `dtype`; buffers keep their dtype.

    `nn.Module.to(dtype)` would also cast RoPE's `inv_freq` (transformers computes it in fp32): a bf16
    copy is off by up to 2^-9 relative, i.e. angles off by position x 2^-9 rad, whole radians at position
    1000. So parameters are cast and buffers only moved."""
    buffers = {name: buf for name, buf in model.named_buffers()}
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)
    for name, buf in buffers.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner._buffers[leaf] = buf.to(device=device)
    return model


def frozen(model: nn.Module) -> nn.Module:
    """`model` in eval mode with no gradients: what a stage only reads (a teacher, the BLD parent)."""
    return model.eval().requires_grad_(False)


CPU_FP32 = Runtime(torch.device("cpu"), "fp32")  # what every stage did before --device / --dtype
