"""Measured latency of sublayer variants and of the fixed parts on the local device (CPU or CUDA).

Each variant is built alone with `puzzle.model.build_attention` / `build_ffn` plus its RMSNorm, with
random weights (latency does not depend on the values), and timed as the decoder layer runs it:
`h + module(norm(h))`.
  prefill  a (B, input_len, D) input; attention writes its K/V into a preallocated cache.
  decode   a (B, 1, D) input; attention writes one K/V slot of a preallocated cache holding
           `decode_context` positions (at most a windowed variant's window) and attends to all of them
           (what a static-cache engine does).
Timing: `warmup` calls, then `repeats` samples of `number` calls each (`number` chosen so a sample
lasts >= `min_sample_s`), CUDA synchronised; the figure is the median per call. On a single CPU
thread the clock is the thread's CPU time (see `_clock`), else wall time.

On CUDA, decode is timed as serving engines run it: the step is captured once in a CUDA graph and
replayed (vLLM's CUDAGraphRunner, TensorRT-LLM's and SGLang's decode graphs), so per-kernel launch
costs, which dominate eager decode of small sublayers, are not counted. One graph holds one call of
every cold copy (`COLD_BYTES`), so a replay still streams every copy's weights from memory; the
figure is the replay time over the copies. Prefill (large kernels) is timed eagerly. `decode_timing`
names the method, which the costs metadata records.
"""

import itertools
import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

from puzzle.device import DTYPES
from puzzle.errors import PuzzleError
from puzzle.model import AttentionConfig, FFNConfig, PuzzleConfig, build_attention, build_ffn

from .hardware import Workload
from .roofline import Phase

# Bytes of weights + KV cache cycled through per measured variant: above the last-level caches of
# today's CPUs (tens of MB) and of an H100 (50 MB L2), so weights stream from memory as in a real model.
COLD_BYTES = 128e6
MAX_COPIES = 64


def torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise PuzzleError(f"cannot measure in {dtype}: eager PyTorch runs {', '.join(DTYPES)}; use --no-measure")
    return DTYPES[dtype]


def local_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # Linux names the CPU model here; elsewhere fall back to the architecture
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with `threads` intra-op threads (None: leave as is), restoring the old setting."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _clock(device: torch.device) -> Callable[[], float]:
    """The timer: this thread's CPU time on a single-threaded CPU run, wall time otherwise.

    On one CPU thread all the work happens on the calling thread, so its CPU time equals the
    latency on an idle machine but leaves out the time the OS hands to other processes: shared
    machines would otherwise inflate (and scatter) every figure. Multi-threaded or CUDA runs need
    wall time (CPU time would add threads up, or miss the GPU).
    """
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time
    return time.perf_counter


def decode_timing(device: torch.device) -> str:
    """How decode is timed on `device`: replayed CUDA graphs on a GPU, eager calls on the CPU."""
    return "cuda_graph" if device.type == "cuda" else "eager"


def cuda_graph(fn: Callable[[], Any], warmup: int = 3) -> Callable[[], None]:
    """`fn` captured in a CUDA graph; returns the replay. Warm-up on a side stream first, as the PyTorch
    CUDA Graphs notes prescribe (lazy initialisation, cuBLAS workspaces and autotuning happen outside the
    capture); static inputs: `fn`'s closures already hold fixed tensors and a preallocated KV cache."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode(), torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def time_calls(calls: list[Callable[[], Any]], device: torch.device, phase: Phase, **timing: Any) -> float:
    """Median seconds per call over the copies in `calls`: eager calls in turn, or (decode on CUDA) one
    replay of a graph calling each copy once, divided by the copies."""
    if phase == "decode" and decode_timing(device) == "cuda_graph":
        replay = cuda_graph(lambda: [call() for call in calls])
        return time_call(replay, device, **timing) / len(calls)
    if len(calls) == 1:
        return time_call(calls[0], device, **timing)
    turn = itertools.cycle(calls)
    return time_call(lambda: next(turn)(), device, **timing)


def time_call(fn: Callable[[], Any], device: torch.device, *, warmup: int = 3, repeats: int = 15, min_sample_s: float = 2e-3) -> float:
    """Median seconds per call of `fn`, after `warmup` calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = _clock(device)
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        sync()
        start = clock()
        fn()
        sync()
        once = max(clock() - start, 1e-7)
        number = max(1, int(min_sample_s / once))
        samples = []
        for _ in range(repeats):
            start = clock()
            for _ in range(number):
                fn()
            sync()
            samples.append((clock() - start) / number)
    return statistics.median(samples)


class StaticKV:
    """A preallocated one-layer KV cache (B, K, S, d) that `GQAttention` writes into at `start`."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        self.k, self.v, self.start = k, v, start

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        self.k[:, :, self.start : self.start + T].copy_(k)
        self.v[:, :, self.start : self.start + T].copy_(v)
        return self.k, self.v


def _inputs(config: PuzzleConfig, workload: Workload, phase: Phase, device: torch.device, dtype: torch.dtype):
    B = workload.batch_size
    T, past = (workload.input_len, 0) if phase == "prefill" else (1, workload.decode_context - 1)
    h = torch.randn(B, T, config.hidden_size, device=device, dtype=dtype)
    position_ids = torch.arange(past, past + T, device=device)[None].expand(B, T)
    rotary = LlamaRotaryEmbedding(config=config).to(device)
    with torch.inference_mode():
        position_embeddings = rotary(h, position_ids)
    return h, position_embeddings, past + T


def sublayer_calls(
    config: PuzzleConfig, kind: str, variant: AttentionConfig | FFNConfig, workload: Workload, phase: Phase,
    device: torch.device, dtype: torch.dtype, cold_bytes: float = COLD_BYTES,
) -> list[Callable[[], torch.Tensor]] | None:
    """Closures each running one copy of a sublayer as the decoder layer does; None for a no-op.

    In a real model every layer has its own weights and KV cache, so each is read from memory, not
    from a cache of the previous call: the copies (weights and KV cache together at least `cold_bytes`,
    at most MAX_COPIES copies) are run in turn.
    """
    if variant.no_op:
        return None
    h, position_embeddings, keys = _inputs(config, workload, phase, device, dtype)
    copies, calls = 0, []
    footprint = 0
    while copies < MAX_COPIES and (copies == 0 or footprint * copies < cold_bytes):
        call, footprint = _one_sublayer(config, kind, variant, workload, h, position_embeddings, keys)
        calls.append(call)
        copies += 1
    return calls


def sublayer_fn(
    config: PuzzleConfig, kind: str, variant: AttentionConfig | FFNConfig, workload: Workload, phase: Phase,
    device: torch.device, dtype: torch.dtype, cold_bytes: float = COLD_BYTES,
) -> Callable[[], torch.Tensor] | None:
    """One closure cycling through `sublayer_calls`' copies; None for a no-op (nothing runs)."""
    calls = sublayer_calls(config, kind, variant, workload, phase, device, dtype, cold_bytes)
    if calls is None:
        return None
    turn = itertools.cycle(calls)
    return lambda: next(turn)()


def _one_sublayer(config, kind, variant, workload, h, position_embeddings, keys) -> tuple[Callable[[], torch.Tensor], int]:
    device, dtype = h.device, h.dtype
    module = build_attention(config, variant) if kind == "attention" else build_ffn(config, variant)
    module = module.to(device=device, dtype=dtype).eval()
    norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps).to(device=device, dtype=dtype)
    footprint = sum(p.numel() * p.element_size() for p in module.parameters())
    if kind == "ffn":
        return (lambda: h + module(norm(h))), footprint
    cache = None
    if variant.is_gqa:
        K = variant.num_key_value_heads(config.num_attention_heads)
        # a windowed variant's engine cache holds at most its window W of past keys at decode (a ring
        # buffer: W keys, no mask); a prefill's T new keys are all cached and masked to the window
        held = max(h.shape[1], int(variant.keys(keys)))
        k = torch.randn(workload.batch_size, K, held, config.head_dim, device=device, dtype=dtype)
        cache = StaticKV(k, torch.randn_like(k), held - h.shape[1])
        footprint += 2 * k.numel() * k.element_size()
    return (lambda: h + module(norm(h), position_embeddings, None, cache, 0)), footprint


def fixed_fn(config: PuzzleConfig, part: str, workload: Workload, phase: Phase, device: torch.device, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """A closure running one fixed part: embedding lookup, final norm, or LM head (last positions)."""
    B = workload.batch_size
    T = workload.input_len if phase == "prefill" else 1
    D, V = config.hidden_size, config.vocab_size
    if part == "embeddings":
        embed = torch.nn.Embedding(V, D, device=device, dtype=dtype)
        ids = torch.randint(0, V, (B, T), device=device)
        return lambda: embed(ids)
    if part == "final_norm":
        norm = LlamaRMSNorm(D, eps=config.rms_norm_eps).to(device=device, dtype=dtype)
        h = torch.randn(B, T, D, device=device, dtype=dtype)
        return lambda: norm(h)
    if part == "lm_head":
        head = torch.nn.Linear(D, V, bias=False, device=device, dtype=dtype)
        h = torch.randn(B, 1, D, device=device, dtype=dtype)
        return lambda: head(h)
    raise ValueError(f"unknown fixed part {part!r}")


def measure_sublayer(
    config: PuzzleConfig, kind: str, variant: AttentionConfig | FFNConfig, workload: Workload,
    device: torch.device | None = None, **timing: Any,
) -> dict[str, float]:
    """{"prefill_s", "decode_s"} of one sublayer variant, measured; zeros for a no-op."""
    device = device or local_device()
    dtype = torch_dtype(workload.dtype)
    out = {}
    for phase in ("prefill", "decode"):
        calls = None  # the previous phase's copies freed before this one's are built: COLD_BYTES held once, not twice
        calls = sublayer_calls(config, kind, variant, workload, phase, device, dtype)
        out[f"{phase}_s"] = 0.0 if calls is None else time_calls(calls, device, phase, **timing)
    return out


def measure_fixed(config: PuzzleConfig, part: str, workload: Workload, device: torch.device | None = None, **timing: Any) -> dict[str, float]:
    """{"prefill_s", "decode_s"} of one fixed part, measured."""
    device = device or local_device()
    dtype = torch_dtype(workload.dtype)
    return {
        f"{phase}_s": time_calls([fixed_fn(config, part, workload, phase, device, dtype)], device, phase, **timing)
        for phase in ("prefill", "decode")
    }


def decode_step_calls(config: PuzzleConfig, workload: Workload, device: torch.device, dtype: torch.dtype) -> list[Callable[[], Any]]:
    """One decode step of a whole model, `config.blocks` as its layers: each layer's sublayers (their own
    random weights and KV cache, no-ops skipped) and the fixed parts, as one list of calls. The calls
    read the same input rather than each other's output: the kernels, their shapes and the bytes they
    stream are a real step's, and timing does not depend on the values."""
    h, position_embeddings, keys = _inputs(config, workload, "decode", device, dtype)
    calls = []
    for block in config.blocks:
        for kind, variant in (("attention", block.attention), ("ffn", block.ffn)):
            if not variant.no_op:
                calls.append(_one_sublayer(config, kind, variant, workload, h, position_embeddings, keys)[0])
    return [fixed_fn(config, "embeddings", workload, "decode", device, dtype), *calls,
            *(fixed_fn(config, part, workload, "decode", device, dtype) for part in ("final_norm", "lm_head"))]


def measure_decode_step(config: PuzzleConfig, workload: Workload, device: torch.device | None = None, **timing: Any) -> float:
    """Seconds per decode step of the whole model at the workload's batch and mean decode context: one CUDA
    graph replay on a GPU (what serving engines run), the eager calls on the CPU. The ratio of a parent's
    figure to a child's is the child's measured decode speedup (scripts/gpu_check.sh)."""
    device = device or local_device()
    calls = decode_step_calls(config, workload, device, torch_dtype(workload.dtype))
    step = lambda: [call() for call in calls]  # noqa: E731
    return time_call(cuda_graph(step) if decode_timing(device) == "cuda_graph" else step, device, **timing)
