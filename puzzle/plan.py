"""`puzzle plan CONFIG.yaml`: a dry run. Per pipeline step, the peak host and GPU memory, disk written,
FLOPs, estimated wall time and the workers/GPUs it can use, from the parent's config alone (no weights; a
GGUF parent's metadata only), the search space and the config's sections; one warning line per step
whose peak exceeds the memory at hand.

One estimator per stage below, each modelling what the stage's code holds TODAY (read from the code,
cited in its docstring), in the dtype the code uses today: float32 (`load_model`'s default) on the CPU.
When a stage changes (bf16, meta-device loading, a BLD memory budget), its estimator changes here, in one
function. Every count comes from `ModelShape` (puzzle/shape.py), the one shape arithmetic.

Symbols as in shape.py; B batch, T sequence length, b = B*T tokens of a batch, P the parent's weight bytes.
Estimates leave out the Python interpreter, torch's own footprint (~0.5 GiB) and allocator slack; times
leave out loading and writing weights (a GGUF parent's dequantisation included) and assume the stage runs
at the stated matmul rate (measured on an idle machine; a busy one measures less and predicts longer).
"""

import inspect
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Literal

from puzzle.errors import PuzzleError
from puzzle.shape import ModelShape

GIB = 1024**3
FP32 = 4  # bytes per element: every stage loads models and trains in float32 today
WORKLOAD_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}  # a hardware profile's workload dtype
TOKEN_BYTES = 4  # prepared blocks are uint32 (puzzle/data/prepare.py DTYPE)
TOKENIZE_PER_S = 2e5  # assumed tokenizer throughput of prepare-data (tokens/s, one core): no FLOPs to count
MIP_SECONDS = 1.0  # assumed per solution: profile + solve + a 10-point sweep took 2 s on the reference parent
CHARS_PER_TOKEN = 4.0  # assumed, to size a corpus without tokenising it when prepare_data has no max_tokens


@dataclass(frozen=True)
class Machine:
    """What the run has: `device` the stages that can use a GPU run on; memory in bytes; FLOP/s achieved."""

    device: Literal["cpu", "cuda"]
    gpus: int
    host_bytes: float
    gpu_bytes: float  # one GPU's memory (0 on cpu)
    cpu_flops: float  # measured fp32 matmul rate of this machine (all threads), or given
    gpu_flops: float  # the hardware profile's fp32 peak x its compute efficiency (0 on cpu)
    throughput_note: str


@dataclass(frozen=True)
class Context:
    """What every estimator reads: the parent's shape, the search space's variants, the prepared data."""

    config: Any  # the parent's transformers config (read without weights)
    shape: ModelShape
    space: Any  # puzzle.search_space.SearchSpace
    seq_len: int  # tokens per prepared block (prepare_data's seq_len)
    train_tokens: int  # prepared training tokens (0 when unknown)
    machine: Machine

    @property
    def parent_bytes(self) -> int:
        return self.shape.model_bytes(None, FP32)

    @property
    def logits_bytes_per_token(self) -> int:
        return self.shape.fixed_activation_bytes_per_token("lm_head", FP32)

    def layer_activation_bytes(self, tokens: int) -> int:
        """One parent decoder layer's op outputs for `tokens` tokens (an inference forward frees each layer's)."""
        return self.shape.activation_bytes_per_token(self.shape.parent_block, FP32) * tokens

    def model_activation_bytes(self, tokens: int) -> int:
        """Every parent layer's op outputs for `tokens` tokens: what a training forward keeps for backward."""
        return self.shape.num_hidden_layers * self.layer_activation_bytes(tokens)


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
    runs_on: str = "cpu"  # where today's code runs it
    seconds: float | None = None  # set by `estimate_time` (or by the estimator when not FLOP-bound)
    note: str = ""
    warnings: list[str] = field(default_factory=list)


# ----- loading ---------------------------------------------------------------------------------------


def load_peak_bytes(ctx: Context, to_puzzle: bool) -> int:
    """Host bytes while a stage loads the parent: `load_model` / `load_puzzle` build the model on the meta
    device and make the tensors read from safetensors its own (one copy, P); `to_puzzle` takes the loaded
    model's tensors themselves (no second copy) (puzzle/model/checkpoint.py, puzzle/model/loading.py).
    `to_puzzle` is kept as an argument: the same P either way."""
    return ctx.parent_bytes


def atomic_save_bytes(tensor_bytes: float) -> float:
    """Host bytes `puzzle.io.atomic_save_safetensors` adds while writing `tensor_bytes` of tensors: the
    serialised file (safetensors' `save`), the slice of it after the header, and the re-headed result,
    alive together: 3x."""
    return 3 * tensor_bytes


# ----- one estimator per stage -----------------------------------------------------------------------


def convert_cost(ctx: Context, args: dict[str, Any]) -> Estimate:
    """convert (a GGUF parent written once as safetensors): load_model + to_puzzle (P: the child takes the
    loaded tensors), then the fp32 safetensors file (P on disk)."""
    return Estimate("", "convert", host_bytes=load_peak_bytes(ctx, True), disk_bytes=ctx.parent_bytes,
                    note="GGUF parent -> fp32 safetensors")


def prepare_data_cost(ctx: Context, args: dict[str, Any]) -> Estimate:
    """prepare-data: tokenises documents one at a time and packs them into uint32 rows of seq_len; holds
    the packed rows (and the token ids of the document being packed) until they are written."""
    tokens = ctx.train_tokens
    return Estimate("", "prepare_data", host_bytes=tokens * TOKEN_BYTES, disk_bytes=tokens * TOKEN_BYTES,
                    seconds=tokens / TOKENIZE_PER_S,
                    note=f"{tokens / 1e6:.1f}M tokens at an assumed {TOKENIZE_PER_S:.0e} tokens/s")


def importance_cost(ctx: Context, args: dict[str, Any]) -> Estimate:
    """importance: to_puzzle(load_model(parent)) (P at load), then forward passes of batch_size x seq_len
    with hooks: one layer's activations and the batch's logits alive at a time; the per-layer statistics
    (heads, neurons, channels) are small (puzzle/pruning/commands.py importance)."""
    shape, T = ctx.shape, args.get("seq_len") or ctx.seq_len
    b = args["batch_size"] * T
    steady = ctx.parent_bytes + ctx.layer_activation_bytes(b) + b * ctx.logits_bytes_per_token
    stats = shape.num_hidden_layers * (shape.num_attention_heads + shape.intermediate_size + shape.hidden_size + 1) * FP32
    return Estimate("", "importance", host_bytes=max(load_peak_bytes(ctx, True), steady), disk_bytes=stats,
                    flops=args["n_samples"] * T * shape.model_flops_per_token(None, T / 2))


def truncated_parent_bytes(shape: ModelShape, last_layer: int, dtype_bytes: int = FP32) -> int:
    """A BLD worker's parent (`load_puzzle(last_layer=...)`): the embeddings and layers 0..last_layer, no
    head, no final norm, read once from safetensors onto the meta-built model."""
    return (shape.fixed_params("embeddings") + (last_layer + 1) * shape.params(shape.parent_block)) * dtype_bytes


def bld_job_bytes(shape: ModelShape, layers: list[int], variants: list[Any], settings: Any, seq_len: int,
                  dtype_bytes: int = FP32) -> int:
    """Host bytes of one BLD job (puzzle/library/ray_jobs.py run_group -> bld.py build_layer_group): the
    `variants` (a subset of those of `layers`) of a contiguous range of layers, trained in lockstep.
      parent      the truncated parent up to max(layers) (`truncated_parent_bytes`): loaded once, 1x
      per layer   the held-out batches' parent activations (h, a, o; eval_tokens) and one training
                  batch's (b tokens); the frozen parent FFN is the parent's own module (`Sublayer.of`)
      per variant trained with AdamW: weights + gradient + 2 moments (4x its params); a linear FFN
                  (least squares) holds X^T X and X^T Y in float64 (2 D^2 x 8) instead
      per step    one variant's op outputs for backward at a time (the variants step one after another)
    Parent-identical variants and no-ops are measured, not trained: no state."""
    D, b = shape.hidden_size, settings.batch_size * seq_len
    hao = 3 * D * dtype_bytes  # h, a, o of one token at one layer
    state = act = 0
    for v in variants:
        if v.is_parent or v.config.no_op:
            continue
        if v.kind == "ffn" and v.config.replace_with_linear:
            state += 2 * D * D * 8
        else:
            p = shape.params(v.config)
            state += p * dtype_bytes + shape.adamw_bytes(p, dtype_bytes)
        act = max(act, shape.activation_bytes_per_token(v.config, dtype_bytes) * b)
    held = len(set(layers)) * hao * (settings.eval_tokens + b)
    return truncated_parent_bytes(shape, max(layers), dtype_bytes) + held + state + act


def build_library_cost(ctx: Context, args: dict[str, Any]) -> Estimate:
    """build-library: the jobs the build itself plans (`ray_jobs.plan_jobs`: contiguous layer groups, one
    per worker, each split into variant subsets that fit `worker_memory_gib` when one is given), each
    costing `bld_job_bytes`. Workers run side by side on this machine: host peak = the jobs that run at
    once (at most `workers`) x the largest job's peak."""
    from puzzle.library.bld import BLDSettings, weight_train_flops
    from puzzle.library.ray_jobs import plan_jobs

    shape, space = ctx.shape, ctx.space
    settings = BLDSettings(**{f.name: args[f.name] for f in fields(BLDSettings) if f.name in args})
    T = settings.seq_len or ctx.seq_len
    b = settings.batch_size * T
    layers = sorted(set(args.get("layers") or range(shape.num_hidden_layers)))
    budget = args.get("worker_memory_gib")
    requested = args["workers"]  # "auto": one per GPU of the planned machine (`puzzle.cluster.auto_workers`)
    requested = (ctx.machine.gpus or 1) if requested == "auto" else int(requested) or 1
    jobs = plan_jobs(space, ctx.config, settings, layers, requested, T, budget * GIB if budget else None)
    workers = min(len(jobs), requested)
    steps = settings.steps(T)

    flops = disk = 0.0
    for job in jobs:
        parent_fwd = sum(shape.flops_per_token(shape.parent_block, T / 2) for _ in range(max(job.layers) + 1))
        flops += steps * b * parent_fwd
        for v in job.variants:
            if v.is_parent or v.config.no_op:
                continue
            frozen = shape.matmul_params(shape.parent_ffn) if v.kind == "attention" else 0
            per_token = weight_train_flops(v.kind, shape.matmul_params(v.config), frozen)
            per_token += 3 * shape.attention_flops(v.config, T / 2)
            flops += steps * b * per_token
            disk += shape.params(v.config) * FP32
    peak = max(job.bytes for job in jobs)
    return Estimate("", "build_library", host_bytes=workers * peak, disk_bytes=disk, flops=flops, workers=workers,
                    note=f"{len(jobs)} job(s) on {workers} worker(s) x {peak / GIB:.1f} GiB, {steps} steps of {b} tokens")


def score_cost(ctx: Context, args: dict[str, Any]) -> Estimate:
    """score (puzzle/scoring/commands.py, replace1.py): load_puzzle(parent) on the host (P), then
    `.to(device)`. On the device: the parent P; per batch the parent's probabilities (b x V fp32),
    two (chunk_tokens, V) temporaries, the cached prefix and final hidden states (a few b x D), one
    library variant's weights; on the host the library entries kept after their first load
    (`store.LibraryReader`, at most `KEEP_LIBRARY` x P). Each variant runs from its layer to the end (the prefix is reused).
    It runs on the plan's --device (its `device` defaults to auto: CUDA where a GPU is visible). Sizes are
    fp32's: the plan does not yet price `--dtype bf16` (puzzle/device.py), which halves the parent's share."""
    shape, T = ctx.shape, ctx.seq_len
    b = args["batch_size"] * T
    V, D, L = shape.vocab_size, shape.hidden_size, shape.num_hidden_layers
    largest = max(shape.params(v.config) for v in ctx.space.variants())
    working = (b * V + 2 * args["chunk_tokens"] * V + 4 * b * D) * FP32 + ctx.layer_activation_bytes(b) + largest * FP32
    on_gpu = ctx.machine.device == "cuda"
    device_bytes = ctx.parent_bytes + working
    block_flops = shape.flops_per_token(shape.parent_block, T / 2)
    head = shape.fixed_flops_per_token("lm_head")
    per_token = shape.model_flops_per_token(None, T / 2)  # the parent reference
    for v in ctx.space.variants():
        if not v.is_parent:
            per_token += shape.flops_per_token(v.config, T / 2) + (L - 1 - v.layer) * block_flops + head
    tokens = args["blocks"] * T
    rows = sum(1 for _ in ctx.space.variants()) * args["blocks"]
    note = "set score: {device: cuda} in the config" if on_gpu and args["device"] == "cpu" else ""
    from puzzle.scoring.commands import KEEP_LIBRARY

    kept = KEEP_LIBRARY * ctx.parent_bytes
    return Estimate("", "score", host_bytes=load_peak_bytes(ctx, True) + kept if on_gpu else device_bytes + kept,
                    gpu_bytes=device_bytes if on_gpu else 0, disk_bytes=rows * 128, flops=tokens * per_token,
                    runs_on=ctx.machine.device, note=note)


def profile_cost(ctx: Context, args: dict[str, Any]) -> Estimate:
    """profile (puzzle/profiling/commands.py, measure.py): the roofline is arithmetic (no model); `measure`
    (a CPU profile, or a GPU profile on a GPU) times each distinct variant alone in the workload's dtype,
    without gradients: one sublayer's weights cycled through COLD_BYTES of copies, a prefill input
    (B, input_len, D) and the sublayer's op outputs on it, and one layer's KV cache of decode_context."""
    from puzzle.profiling.hardware import load_profile
    from puzzle.profiling.measure import COLD_BYTES

    shape, profile = ctx.shape, load_profile(args["budget"])
    kind = profile.device.kind
    measured = args["measure"] if args["measure"] is not None else (kind == "cpu" or ctx.machine.device == "cuda")
    if not measured:
        return Estimate("", "profile", note=f"{profile.name}: roofline (no model)", seconds=0.0)
    w, e = profile.workload, WORKLOAD_BYTES[profile.workload.dtype]
    sublayer = max(shape.activation_bytes_per_token(p, e) for p in (shape.parent_attention, shape.parent_ffn))
    held = (COLD_BYTES + sublayer * w.batch_size * w.input_len
            + shape.kv_cache_bytes_per_token(shape.parent_block, e) * w.batch_size * w.decode_context)
    distinct = {(v.kind, v.name): v.config for v in ctx.space.variants()}
    flops = sum(args["repeats"] * w.batch_size * (shape.prefill_flops(c, w.input_len) + shape.flops_per_token(c, w.decode_context))
                for c in distinct.values())
    runs_on = "cuda" if kind == "gpu" else "cpu"
    return Estimate("", "profile", host_bytes=held if runs_on == "cpu" else 0, gpu_bytes=held if runs_on == "cuda" else 0,
                    flops=flops, runs_on=runs_on, note=f"{profile.name}: measured, {len(distinct)} variants")


def solve_cost(ctx: Context, args: dict[str, Any]) -> Estimate:
    """solve: a MIP over (layers x variants) binaries, small: about MIP_SECONDS per solution (a sweep
    solves one per point), at most time_limit_s each."""
    count = args["num_solutions"]
    if args.get("sweep"):
        lo, hi, step = (float(x) for x in str(args["sweep"]).split(":"))
        count = int(round((hi - lo) / step)) + 1
    return Estimate("", "solve", seconds=count * MIP_SECONDS,
                    note=f"{count} MIP(s), ~{MIP_SECONDS:.0f} s each assumed (<= {args['time_limit_s']:.0f} s)")


def realize_cost(ctx: Context, args: dict[str, Any]) -> Estimate:
    """realize (puzzle/realize/commands.py, assemble.py stream_child): the child built on the meta device
    and filled one sublayer at a time from the parent's safetensors and the library (the child, at most
    the parent's size P, plus one sublayer), then written in the parent's dtype."""
    return Estimate("", "realize", host_bytes=ctx.parent_bytes, disk_bytes=ctx.parent_bytes,
                    note="child <= parent")


def distill_cost(ctx: Context, args: dict[str, Any]) -> Estimate:
    """distill / GKD (puzzle/distill/commands.py, trainer.py), the student bounded by the parent:
      teacher   load_model (P); to_puzzle takes its tensors (no copy): P
      student   weights + gradient + 2 AdamW moments: 4P
      per step  the student's op outputs of a micro-batch for backward (every layer), the teacher's final
                hidden states (b x D), two (chunk_tokens, V) logits chunks for the KL; with a hidden loss,
                the teacher's hidden states of every layer (L + 1 of b x D)
      checkpoint  every checkpoint_every steps the student and then the 2 AdamW moments are written with
                `atomic_save_safetensors` (`atomic_save_bytes` of the moments, 2P) next to everything
                above but the activations (the freed gradients stay in the process: glibc keeps them)
    Disk: keep_checkpoints checkpoints (weights + 2 moments) and the final student."""
    shape, T = ctx.shape, ctx.seq_len
    b = args["batch_size"] * T
    P = ctx.parent_bytes
    act = ctx.model_activation_bytes(b) + (b * shape.hidden_size + 2 * args["chunk_tokens"] * shape.vocab_size) * FP32
    if args["hidden_loss"] != "none":
        act += (shape.num_hidden_layers + 1) * b * shape.hidden_size * FP32
    params = shape.total_params()
    resident = P + P + shape.adamw_bytes(params, FP32)
    host = resident + max(act, atomic_save_bytes(2 * P))
    tokens = args["steps"] * args["grad_accum"] * b
    forward = shape.model_flops_per_token(None, T / 2)
    val = math.ceil(args["steps"] / args["val_every"]) * args["val_blocks"] * T * 2 * forward
    from puzzle.distill.trainer import DistillConfig

    keep = DistillConfig.keep_checkpoints  # not a distill() argument: its default holds
    return Estimate("", "distill", host_bytes=host, disk_bytes=(3 * keep + 1) * P,
                    flops=tokens * 4 * forward + val, note="student <= parent")


def evaluate_cost(ctx: Context, args: dict[str, Any]) -> Estimate:
    """evaluate (puzzle/evaluate/commands.py, quality.py): load_model of the model (<= P) and of the
    parent (P); per batch both models' logits (b x V each) and their log-softmax temporaries."""
    shape, T = ctx.shape, ctx.seq_len
    b = args["batch_size"] * T
    host = 2 * ctx.parent_bytes + 4 * b * ctx.logits_bytes_per_token + ctx.layer_activation_bytes(b)
    flops = args["val_blocks"] * T * 2 * shape.model_flops_per_token(None, T / 2)
    return Estimate("", "evaluate", host_bytes=host, flops=flops, note="model <= parent, next to the parent")


ESTIMATORS: dict[str, Callable[[Context, dict[str, Any]], Estimate]] = {
    "convert": convert_cost, "prepare_data": prepare_data_cost, "importance": importance_cost,
    "build_library": build_library_cost, "score": score_cost, "profile": profile_cost, "solve": solve_cost,
    "realize": realize_cost, "distill": distill_cost, "evaluate": evaluate_cost,
}


def job_estimate(stage: str, config: Any, space: Any, seq_len: int, args: dict[str, Any], device: str = "cpu") -> Estimate:
    """One Ray job's resources (`puzzle.cluster.job_resources` turns them into its request): `stage`'s
    estimator on a machine of one `device`, with the job's arguments over the stage function's defaults."""
    from puzzle.stages import stage_functions

    cuda = device.startswith("cuda")
    m = Machine("cuda" if cuda else "cpu", int(cuda), 0.0, 0.0, 0.0, 0.0, "one Ray worker")
    ctx = Context(config, ModelShape.from_config(config), space, seq_len, 0, m)
    return ESTIMATORS[stage](ctx, stage_arguments(stage_functions()[stage], args))


# ----- the machine -----------------------------------------------------------------------------------


def measure_cpu_flops(n: int = 512, seconds: float = 0.3) -> float:
    """This machine's fp32 matmul rate (FLOP/s, torch's threads): n x n matmuls for about `seconds`."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    count, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / elapsed


def host_memory_bytes() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def machine(device: str, gpus: int | None, gpu_memory_gib: float | None, host_memory_gib: float | None,
            budget: str, cpu_gflops: float | None) -> Machine:
    """The machine the plan is for: given values, else this machine's (device auto: CUDA when present),
    else the hardware profile's GPU."""
    import torch

    from puzzle.profiling.hardware import load_profile

    if device not in ("auto", "cpu", "cuda"):
        raise PuzzleError(f"device must be auto, cpu or cuda, got {device!r}")
    here = torch.cuda.is_available()
    device = ("cuda" if here else "cpu") if device == "auto" else device
    for name, value in (("gpus", gpus), ("gpu-memory-gib", gpu_memory_gib), ("host-memory-gib", host_memory_gib),
                        ("cpu-gflops", cpu_gflops)):
        if value is not None and value <= 0:
            raise PuzzleError(f"{name} must be positive, got {value}")
    host = host_memory_gib * GIB if host_memory_gib else host_memory_bytes()
    cpu = cpu_gflops * 1e9 if cpu_gflops else measure_cpu_flops()
    cpu_note = f"CPU: {cpu / 1e9:.0f} GFLOP/s fp32 ({'given' if cpu_gflops else 'measured matmul rate'})"
    if device == "cpu":
        return Machine("cpu", 0, host, 0.0, cpu, 0.0, cpu_note)
    profile = load_profile(budget)
    if gpu_memory_gib:
        gpu_mem = gpu_memory_gib * GIB
    elif here:
        gpu_mem = float(torch.cuda.get_device_properties(0).total_memory)
    else:
        gpu_mem = profile.device.memory_bytes
    peak = profile.device.peak_flops.get("fp32") or max(profile.device.peak_flops.values())
    gpu_flops = peak * profile.device.compute_efficiency
    note = (f"{cpu_note}; GPU: {profile.name} fp32 peak {peak / 1e12:.1f} TFLOP/s x efficiency "
            f"{profile.device.compute_efficiency} (the code computes in fp32 today)")
    count = gpus or (torch.cuda.device_count() if here else 1)
    return Machine("cuda", count, host, gpu_mem, cpu, gpu_flops, note)


# ----- putting it together ---------------------------------------------------------------------------


def stage_arguments(fn: Callable[..., Any], args: dict[str, Any]) -> dict[str, Any]:
    """The step's arguments over its function's defaults (the signature is the one place they live)."""
    defaults = {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **args}


def _corpus_tokens(corpus: Path) -> int:
    if not corpus.exists():
        return 0
    files = [corpus] if corpus.is_file() else [p for p in corpus.rglob("*") if p.is_file()]
    return int(sum(p.stat().st_size for p in files) / CHARS_PER_TOKEN)


def estimate_time(e: Estimate, m: Machine) -> None:
    """Wall time from FLOPs at the step's device's rate (unless its estimator set one)."""
    if e.seconds is None:
        rate = m.gpu_flops * max(1, min(e.workers, m.gpus)) if e.runs_on == "cuda" else m.cpu_flops
        e.seconds = e.flops / rate


def check_fit(e: Estimate, m: Machine) -> None:
    """One warning line per memory the step's peak exceeds."""
    if e.host_bytes > m.host_bytes:
        e.warnings.append(f"warning: {e.step} needs ~{e.host_bytes / GIB:.1f} GiB of host memory; "
                          f"{m.host_bytes / GIB:.1f} GiB available")
    if e.gpu_bytes > m.gpu_bytes and e.runs_on == "cuda":
        e.warnings.append(f"warning: {e.step} needs ~{e.gpu_bytes / GIB:.1f} GiB of GPU memory; "
                          f"{m.gpu_bytes / GIB:.1f} GiB per GPU available")


def estimate(config: Path, m: Machine) -> tuple[ModelShape, list[Estimate]]:
    """Every step of a pipeline config, estimated (the parent's config is read, never its weights)."""
    from puzzle.model.checkpoint import load_config
    from puzzle.pipeline import RunConfig, check_plan
    from puzzle.pipeline_stages import plan as plan_steps
    from puzzle.search_space import load_search_space
    from puzzle.stages import stage_functions

    cfg = RunConfig.load(Path(config))
    if not cfg.parent.exists():
        raise PuzzleError(f"parent not found: {cfg.parent}")
    parent_config = load_config(cfg.parent)
    space = load_search_space(cfg.search_space, parent_config)
    fns = stage_functions()
    steps = plan_steps(cfg, fns)
    check_plan(cfg, steps, fns, inputs=False)
    prep = next((stage_arguments(fns[s.fn], s.args) for s in steps if s.fn == "prepare_data"), stage_arguments(fns["prepare_data"], {}))
    tokens = prep["max_tokens"] or _corpus_tokens(cfg.corpus)
    shape = ModelShape.from_config(parent_config)
    ctx = Context(parent_config, shape, space, prep["seq_len"], int(tokens * (1 - prep["val_fraction"])), m)
    out = []
    for step in steps:
        fn = ESTIMATORS.get(step.fn)
        if fn is None:  # report, build_mc, prune: no model-sized work modelled
            out.append(Estimate(step.name, step.fn, seconds=0.0, note="not modelled (small)"))
            continue
        e = fn(ctx, stage_arguments(fns[step.fn], step.args))
        e.step = step.name
        estimate_time(e, m)
        check_fit(e, m)
        out.append(e)
    return shape, out


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def table(shape: ModelShape, estimates: list[Estimate], m: Machine) -> str:
    lines = [f"parent: {shape.total_params() / 1e9:.3f}B parameters ({_gib(shape.model_bytes(None, FP32))} GiB in fp32), "
             f"{shape.num_hidden_layers} layers, hidden {shape.hidden_size}",
             f"machine: {m.device}, {m.gpus} GPU(s) x {_gib(m.gpu_bytes)} GiB, host {_gib(m.host_bytes)} GiB",
             f"throughput: {m.throughput_note}", ""]
    head = f"{'step':<28} {'runs on':>7} {'workers':>7} {'host GiB':>9} {'GPU GiB':>8} {'disk GiB':>9} {'TFLOP':>10} {'time':>9}"
    lines += [head, "-" * len(head)]
    for e in estimates:
        lines.append(f"{e.step:<28} {e.runs_on:>7} {e.workers:>7} {_gib(e.host_bytes):>9} {_gib(e.gpu_bytes):>8} "
                     f"{_gib(e.disk_bytes):>9} {e.flops / 1e12:>10.2f} {_duration(e.seconds):>9}  {e.note}")
    total = sum(e.seconds or 0 for e in estimates)
    lines += ["-" * len(head), f"{'total':<28} {'':>7} {'':>7} {_gib(max(e.host_bytes for e in estimates)):>9} "
              f"{_gib(max(e.gpu_bytes for e in estimates)):>8} {_gib(sum(e.disk_bytes for e in estimates)):>9} "
              f"{sum(e.flops for e in estimates) / 1e12:>10.2f} {_duration(total):>9}  (peaks: max; disk, FLOPs, time: sums)"]
    return "\n".join(lines)


def plan(
    config: Path,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    gpus: int | None = None,
    gpu_memory_gib: float | None = None,
    host_memory_gib: float | None = None,
    budget: str = "h100_80gb",
    cpu_gflops: float | None = None,
    json: Path | None = None,
) -> dict[str, Any]:
    """Dry run: per step, peak host/GPU memory, disk, FLOPs and time of a pipeline config, from the parent's config alone

    Reads the parent's config.json (a GGUF's metadata), never its weights. Each stage is modelled as the
    code runs it today (fp32 on the CPU; score and profile can use CUDA). Prints a table and one warning
    line per step whose peak exceeds the memory given (or this machine's); exits 0 with warnings.

    Args:
        config: pipeline YAML (as for puzzle run)
        device: where the stages that can use a GPU run (auto: CUDA when this machine has one)
        gpus: GPUs available (default: this machine's, or 1)
        gpu_memory_gib: memory of one GPU (default: this machine's GPU, else the budget profile's)
        host_memory_gib: host memory (default: this machine's)
        budget: hardware profile whose GPU peak FLOP/s x efficiency sets GPU time (and GPU memory
            when there is no GPU here)
        cpu_gflops: CPU fp32 matmul rate (default: measured here for a fraction of a second)
        json: also write the numbers to this JSON file
    """
    from puzzle.io import atomic_write_json

    m = machine(device, gpus, gpu_memory_gib, host_memory_gib, budget, cpu_gflops)
    shape, estimates = estimate(Path(config), m)
    print(table(shape, estimates, m))
    for e in estimates:
        for w in e.warnings:
            print(w)
    result = {"parent": {"params": shape.total_params(), "fp32_bytes": shape.model_bytes(None, FP32), **asdict(shape)},
              "machine": asdict(m), "steps": [asdict(e) for e in estimates],
              "total_seconds": sum(e.seconds or 0 for e in estimates)}
    if json is not None:
        atomic_write_json(json, result)
    return result
