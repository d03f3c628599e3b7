"""The vocabulary every stage's cost model speaks (`puzzle plan`, the Ray jobs' requests): what a machine
has (`Machine`), what an estimator reads (`Context`), what it returns (`Estimate`), and the footprint rules
several stages share (loading, unread weights, streamed writes, where bytes live). No torch at import: the
stages' cost modules (puzzle/<stage>/cost.py) build on this, and `puzzle plan` aggregates them.

Symbols as in shape.py; B batch, T sequence length, b = B*T tokens of a batch, e the bytes of the stage's
low dtype (4 fp32, 2 bf16/fp16), P_e the parent's weight bytes in it. Training keeps fp32 master weights
and AdamW state whatever e is. Host estimates include one `PROCESS_BASELINE_BYTES` per process (the
interpreter, torch and transformers), not allocator slack.
"""

import inspect
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Literal

from puzzle.dtypes import BYTES as DTYPE_BYTES, name_of  # a stage's --dtype, or a hardware profile's workload dtype
from puzzle.errors import PuzzleError
from puzzle.shape import ModelShape
from puzzle.units import GIB

FP32 = DTYPE_BYTES["fp32"]  # bytes per element of master weights, optimizer state, probabilities and losses (always fp32)
# RSS of a stage's process before it loads anything: the interpreter + torch + transformers + puzzle's
# imports. Measured: prepare-data's whole peak in benchmarks/scale.md (0.43 GiB; it holds a few MB of
# tokens and a tokenizer).
PROCESS_BASELINE_BYTES = int(0.4 * GIB)


@dataclass(frozen=True)
class Machine:
    """What the run has: `device` the stages that can use a GPU run on; memory in bytes; FLOP/s achieved."""

    device: Literal["cpu", "cuda"]
    gpus: int
    host_bytes: float
    gpu_bytes: float  # one GPU's memory (0 on cpu)
    cpu_flops: float  # measured fp32 matmul rate of this machine (all threads), or given
    gpu_flops: float  # the hardware profile's fastest dense peak x its compute efficiency (0 on cpu)
    throughput_note: str
    gpu_flops_by_dtype: dict[str, float] = field(default_factory=dict)  # the profile's peak per dtype x efficiency

    def gpu_rate(self, dtype: str) -> float:
        """GPU FLOP/s for matmuls in `dtype` (fp16 at bf16's rate; a dtype the profile lacks: `gpu_flops`)."""
        rates = self.gpu_flops_by_dtype
        return rates.get(dtype) or rates.get("bf16" if dtype == "fp16" else dtype) or self.gpu_flops

    @classmethod
    def one_worker(cls, device: str) -> "Machine":
        """One Ray worker of `device` (cpu, cuda): what a job's request is estimated on."""
        cuda = device.startswith("cuda")
        return cls("cuda" if cuda else "cpu", int(cuda), 0.0, 0.0, 0.0, 0.0, "one Ray worker")


@dataclass(frozen=True)
class Context:
    """What every estimator reads: the parent's shape, the search space's variants, the prepared data."""

    config: Any  # the parent's transformers config (read without weights)
    shape: ModelShape
    space: Any  # puzzle.search_space.SearchSpace
    seq_len: int  # tokens per prepared block (prepare_data's seq_len)
    train_tokens: int  # prepared training tokens (0 when unknown)
    machine: Machine

    @classmethod
    def one_worker(cls, config: Any, space: Any, seq_len: int, device: str) -> "Context":
        """The context of one Ray job on a worker of `device` (its request: puzzle/cluster.py `job_resources`)."""
        return cls(config, ModelShape.from_config(config), space, seq_len, 0, Machine.one_worker(device))

    @property
    def parent_bytes(self) -> int:
        """The parent's weights in fp32 (what the table's header and the JSON's `fp32_bytes` report)."""
        return self.shape.model_bytes(None, FP32)

    def model_bytes(self, e: int) -> int:
        """The parent's weights at `e` bytes per element (P_e): a child is at most this."""
        return self.shape.model_bytes(None, e)

    @property
    def logits_bytes_per_token(self) -> int:
        """Logits as the stages' losses and statistics use them: upcast to fp32 whatever the model's dtype."""
        return self.shape.fixed_activation_bytes_per_token("lm_head", FP32)

    def layer_activation_bytes(self, tokens: int, e: int = FP32) -> int:
        """One parent decoder layer's op outputs for `tokens` tokens (an inference forward frees each layer's; the
        largest layer's where an MoE parent's layers differ)."""
        return max(self.shape.activation_bytes_per_token(b, e) for b in dict.fromkeys(self.shape.parent_blocks)) * tokens

    def model_activation_bytes(self, tokens: int, e: int = FP32) -> int:
        """Every parent layer's op outputs for `tokens` tokens: what a training forward keeps for backward."""
        return self.shape.num_hidden_layers * self.layer_activation_bytes(tokens, e)

    def runtime(self, device: str = "cpu", dtype: str = "auto") -> tuple[str, str]:
        """(device kind, dtype name) a stage with these `--device` / `--dtype` runs in on the planned machine:
        device auto is the machine's, the names resolved as puzzle/device.py resolves them for work elsewhere
        (auto: bf16 on CUDA, fp32 on the CPU). A stage without the arguments runs on the CPU in fp32."""
        from puzzle.device import resolve_remote  # torch, deferred: this module stays importable without it

        device = self.machine.device if str(device) == "auto" else str(device)
        rt = resolve_remote(device, dtype)
        return rt.device.type, rt.dtype_name

    def stored_dtype(self) -> str:
        """The parent's stored dtype from its config (`dtype`, transformers 4's `torch_dtype`; fp32 when
        absent, as convert writes)."""
        stored = getattr(self.config, "dtype", None) or getattr(self.config, "torch_dtype", None)
        return name_of(stored or "float32") or "fp32"


@dataclass
class Estimate:
    """One step's resources. `host_bytes` / `gpu_bytes` are peaks; flops and disk are totals."""

    step: str
    stage: str
    host_bytes: float = 0.0
    gpu_bytes: float = 0.0
    disk_bytes: float = 0.0
    flops: float = 0.0
    workers: int = 1  # processes / GPUs the step can use
    runs_on: str = "cpu"  # where the stage runs on the planned machine
    dtype: str = "fp32"  # the dtype its matmuls run in (sets the GPU's rate)
    seconds: float | None = None  # set by the planner from the FLOPs (or by the estimator when not FLOP-bound)
    io_seconds: float = 0.0  # time no FLOP rate bounds (offload copies, a CPU optimizer step): added to the FLOPs'
    note: str = ""
    warnings: list[str] = field(default_factory=list)


def stage_settings(fn: Callable[..., Any], args: dict[str, Any]) -> SimpleNamespace:
    """A stage's settings as its cost model reads them: `args` over the stage function's own defaults (its
    signature is the one place they live), as attributes named by its parameters. A parameter without a
    default reads None until given; an argument the function does not take is refused, and a cost model
    reading a name the function lacks raises AttributeError (tests/test_stage_costs.py reads every cost
    model's attributes against its stage's signature, so a rename fails there, on every path)."""
    params = inspect.signature(fn).parameters
    unknown = sorted(set(args) - set(params))
    if unknown:
        raise PuzzleError(f"{fn.__name__} takes no argument {', '.join(unknown)}")
    empty = inspect.Parameter.empty
    defaults = {k: None if p.default is empty else p.default for k, p in params.items()}
    return SimpleNamespace(**{**defaults, **args})


# ----- footprint rules the stages share --------------------------------------------------------------


def load_peak_bytes(ctx: Context, e: int) -> int:
    """Host bytes while a stage loads the parent at `e` bytes per element: `load_model` / `load_puzzle`
    build the model on the meta device and make the tensors read from safetensors its own (one copy,
    P_e); `to_puzzle` takes the loaded model's tensors themselves (puzzle/model/loading.py). A stage on a
    GPU loads on the host and then places the model (`device.place`), freeing the host copy."""
    return ctx.model_bytes(e)


def unread_bytes(ctx: Context, device: str, e: int, logits: bool, head: bool = True) -> int:
    """Weights a CPU stage never pages in, to take off the model bytes it holds. On the CPU a parent stored in
    the stage's dtype is not copied: safetensors' `safe_open(...).get_tensor` returns views of the file's
    memory map (safetensors 0.8: `safe_open` maps the file, the tensor is built on the mapping) and the
    model takes them as its parameters (`load_state_dict(assign=True)`, puzzle/model/loading.py), so a
    weight counts in the process's RSS only once read. The embedding table is read a row per looked-up
    token (a few MiB: ~0); an untied LM head only by a stage that computes logits; a tied one is the
    table, read whole by the logits. `head`: whether the stage's model has an LM head at all (a BLD
    worker's truncated parent has none). Anything else (a GPU, a dtype conversion) reads every weight."""
    if device != "cpu" or DTYPE_BYTES[ctx.stored_dtype()] != e:
        return 0
    shape = ctx.shape
    table, untied_head = shape.fixed_params("embeddings") * e, shape.fixed_params("lm_head") * e
    if shape.tie_word_embeddings:
        return 0 if head and logits else table
    return table + (untied_head if head and not logits else 0)


def atomic_save_bytes(shape: ModelShape, dtype_bytes: int, device: str) -> float:
    """Host bytes `puzzle.io.atomic_save_safetensors` adds while writing a model's worth of tensors (its
    weights, or one AdamW moment of each) in `dtype_bytes` from `device`. The writer streams each tensor's
    bytes from its own storage (`write_safetensors`): contiguous CPU tensors add nothing; a tensor on a GPU
    (or not contiguous, or converted) is copied to the host one at a time, so at most the largest: the
    embedding table or one FFN matrix."""
    if device != "cuda":
        return 0.0
    return max(shape.fixed_params("embeddings"), shape.hidden_size * shape.intermediate_size) * dtype_bytes


def placed(e: Estimate, device: str, host_loaded: float, working: float, processes: int = 1) -> Estimate:
    """Where a stage's bytes live. On the CPU: per process the baseline + `working` (the model and
    everything else it holds) on the host. On CUDA: `working` on each GPU, and on the host per process the
    baseline + `host_loaded` (what it loads before placing it, or writes from the GPU)."""
    e.runs_on = device
    if device == "cuda":
        e.gpu_bytes, e.host_bytes = working, processes * (PROCESS_BASELINE_BYTES + host_loaded)
    else:
        e.host_bytes = processes * (PROCESS_BASELINE_BYTES + working)
    return e
