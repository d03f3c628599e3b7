"""`puzzle plan CONFIG.yaml`: a dry run. Per pipeline step, the peak host and GPU memory, disk written,
FLOPs, estimated wall time and the workers/GPUs it can use, from the parent's config alone (no weights; a
GGUF parent's metadata only), the search space and the config's sections; one warning line per step
whose peak exceeds the memory at hand.

One estimator per stage below, each modelling what the stage's code holds (read from the code, cited in
its docstring) on the device and in the dtype its `--device` / `--dtype` resolve to on the planned machine
(`Context.runtime`: auto = CUDA + bf16 on a GPU machine, CPU + fp32 otherwise, as puzzle/device.py
resolves them). When a stage changes, its estimator changes here, in one function. Every count comes from
`ModelShape` (puzzle/shape.py), the one shape arithmetic.

Symbols as in shape.py; B batch, T sequence length, b = B*T tokens of a batch, e the bytes of the stage's
low dtype (4 fp32, 2 bf16/fp16), P_e the parent's weight bytes in it. Training keeps fp32 master weights
and AdamW state whatever e is. Host estimates include one `PROCESS_BASELINE_BYTES` per process (the
interpreter, torch and transformers), not allocator slack; times leave out loading and writing weights (a
GGUF parent's dequantisation included) and assume the stage runs at the stated matmul rate (measured on an
idle machine; a busy one measures less and predicts longer).
"""

import inspect
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Literal

from puzzle.dtypes import BYTES as DTYPE_BYTES, name_of  # a stage's --dtype, or a hardware profile's workload dtype
from puzzle.errors import PuzzleError
from puzzle.shape import ModelShape
from puzzle.units import GIB, host_memory_bytes

FP32 = DTYPE_BYTES["fp32"]  # bytes per element of master weights, optimizer state, probabilities and losses (always fp32)
# RSS of a stage's process before it loads anything: the interpreter + torch + transformers + puzzle's
# imports. Measured: prepare-data's whole peak in benchmarks/scale.md (0.43 GiB; it holds a few MB of
# tokens and a tokenizer).
PROCESS_BASELINE_BYTES = int(0.4 * GIB)
TOKEN_BYTES = 4  # prepared blocks are uint32 (puzzle/data/prepare.py DTYPE)
TOKENIZE_PER_S = 2e5  # assumed tokenizer throughput of prepare-data (tokens/s, one core): no FLOPs to count
MIP_SECONDS = 1.0  # assumed per solution: profile + solve + a 10-point sweep took 2 s on the reference parent
CHARS_PER_TOKEN = 4.0  # assumed, to size a corpus without tokenising it when prepare_data has no max_tokens
# assumed for GKD's CPU offload: pinned host <-> GPU copies over PCIe Gen4/5 x16 (each direction), and the
# host memory bandwidth a CPU AdamW step streams at (a server's several DDR5 channels, not one core's)
PCIE_BYTES_PER_S = 25e9
HOST_BYTES_PER_S = 50e9


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
        """One parent decoder layer's op outputs for `tokens` tokens (an inference forward frees each layer's)."""
        return self.shape.activation_bytes_per_token(self.shape.parent_block, e) * tokens

    def model_activation_bytes(self, tokens: int, e: int = FP32) -> int:
        """Every parent layer's op outputs for `tokens` tokens: what a training forward keeps for backward."""
        return self.shape.num_hidden_layers * self.layer_activation_bytes(tokens, e)

    def runtime(self, args: dict[str, Any]) -> tuple[str, str]:
        """(device kind, dtype name) a stage with these arguments runs in on the planned machine: its
        `device` (auto: the machine's) and its `dtype` resolved as puzzle/device.py resolves them (auto:
        bf16 on CUDA, fp32 on the CPU); a stage without the arguments runs on the CPU in fp32."""
        from puzzle.device import resolve_remote

        device = str(args.get("device", "cpu"))
        device = self.machine.device if device == "auto" else device
        rt = resolve_remote(device, args.get("dtype", "auto"))
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
    seconds: float | None = None  # set by `estimate_time` (or by the estimator when not FLOP-bound)
    io_seconds: float = 0.0  # time no FLOP rate bounds (offload copies, a CPU optimizer step): added to the FLOPs'
    note: str = ""
    warnings: list[str] = field(default_factory=list)


# ----- loading ---------------------------------------------------------------------------------------


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


# ----- one estimator per stage -----------------------------------------------------------------------


def convert_cost(ctx: Context, args: dict[str, Any]) -> Estimate:
    """convert (a GGUF parent written once as safetensors, puzzle/model/convert.py): transformers' GGUF
    loader dequantises to fp32 (P_fp32), to_puzzle takes the tensors, then the file in `dtype`."""
    e = DTYPE_BYTES.get(name_of(args.get("dtype", "fp32")), FP32)
    return Estimate("", "convert", host_bytes=PROCESS_BASELINE_BYTES + load_peak_bytes(ctx, FP32),
                    disk_bytes=ctx.model_bytes(e), note="GGUF parent -> safetensors")


def prepare_data_cost(ctx: Context, args: dict[str, Any]) -> Estimate:
    """prepare-data: tokenises documents one at a time and packs them into uint32 rows of seq_len; holds
    the packed rows (and the token ids of the document being packed) until they are written."""
    tokens = ctx.train_tokens
    return Estimate("", "prepare_data", host_bytes=PROCESS_BASELINE_BYTES + tokens * TOKEN_BYTES,
                    disk_bytes=tokens * TOKEN_BYTES, seconds=tokens / TOKENIZE_PER_S,
                    note=f"{tokens / 1e6:.1f}M tokens at an assumed {TOKENIZE_PER_S:.0e} tokens/s")


def importance_cost(ctx: Context, args: dict[str, Any]) -> Estimate:
    """importance: to_puzzle(load_model(parent, dtype)) placed on its device (P_e; on the CPU less what it
    never reads, `unread_bytes`), then forward passes of batch_size x seq_len with hooks: one layer's
    activations (e) and, when drop_samples > 0, the batch's logits (fp32) alive at a time; the per-layer
    statistics (heads, neurons, channels; fp32) are small (puzzle/pruning/commands.py)."""
    from puzzle.metrics import CHUNK_TOKENS, KL_CHUNK_TEMPORARIES

    shape, T = ctx.shape, args.get("seq_len") or ctx.seq_len
    device, dtype = ctx.runtime(args)
    e, b = DTYPE_BYTES[dtype], args["batch_size"] * T
    logits = args["drop_samples"] > 0  # only the drop-layer losses use the LM head (importance.py)
    working = ctx.model_bytes(e) - unread_bytes(ctx, device, e, logits) + ctx.layer_activation_bytes(b, e)
    if logits:  # the batch's reference logits, and one chunk's loss temporaries per dropped run (kd_terms)
        working += (b + KL_CHUNK_TEMPORARIES * min(b, CHUNK_TOKENS)) * ctx.logits_bytes_per_token
    stats = shape.num_hidden_layers * (shape.num_attention_heads + shape.intermediate_size + shape.hidden_size + 1) * FP32
    est = Estimate("", "importance", disk_bytes=stats, dtype=dtype,
                   flops=args["n_samples"] * T * shape.model_flops_per_token(None, T / 2))
    return placed(est, device, load_peak_bytes(ctx, e), working)


def truncated_parent_bytes(shape: ModelShape, last_layer: int, dtype_bytes: int = FP32) -> int:
    """A BLD worker's parent (`load_puzzle(last_layer=...)`): the embeddings and layers 0..last_layer, no
    head, no final norm, read once from safetensors onto the meta-built model, in the training's low dtype."""
    return (shape.fixed_params("embeddings") + (last_layer + 1) * shape.params(shape.parent_block)) * dtype_bytes


def bld_job_bytes(shape: ModelShape, layers: list[int], variants: list[Any], settings: Any, seq_len: int) -> int:
    """Bytes of one BLD job (puzzle/library/ray_jobs.py run_group -> bld.py build_layer_group), on its
    worker's device, the process's baseline left out: the `variants` (a subset of those of `layers`) of a
    contiguous range of layers, trained in lockstep; e the low dtype of `settings.dtype` (resolved):
      parent      the truncated parent up to max(layers) in e (`truncated_parent_bytes`): loaded once, 1x
      per layer   the held-out batches' parent activations (h, a, o in e; eval_tokens) and one training
                  batch's (b tokens); the frozen parent FFN is the parent's own module (`Sublayer.of`)
      per variant trained with AdamW in fp32 whatever e: weights + gradient + 2 moments (4 x 4 bytes per
                  param); a linear FFN (least squares) holds X^T X and X^T Y in float64 (2 D^2 x 8) instead
      per step    one variant's op outputs for backward at a time (the variants step one after another),
                  in e under autocast
    Parent-identical variants and no-ops are measured, not trained: no state."""
    e = DTYPE_BYTES[settings.dtype]
    D, b = shape.hidden_size, settings.batch_size * seq_len
    hao = 3 * D * e  # h, a, o of one token at one layer
    state = act = 0
    for v in variants:
        if v.is_parent or v.config.no_op:
            continue
        if v.kind == "ffn" and v.config.replace_with_linear:
            state += 2 * D * D * 8
        else:
            p = shape.params(v.config)
            state += p * FP32 + shape.adamw_bytes(p, FP32)
        act = max(act, shape.activation_bytes_per_token(v.config, e) * b)
    held = len(set(layers)) * hao * (settings.eval_tokens + b)
    return truncated_parent_bytes(shape, max(layers), e) + held + state + act


def build_library_cost(ctx: Context, args: dict[str, Any]) -> Estimate:
    """build-library: the jobs the build itself plans (`ray_jobs.plan_jobs`: contiguous layer groups, one
    per worker, each split into variant subsets that fit `worker_memory_gib` when one is given), each
    costing `bld_job_bytes` on its worker's device. Workers run side by side (one GPU each on CUDA): the
    host holds, per worker process running at once, the baseline + the largest job (CPU) or the truncated
    parent it loads before placing it (CUDA); each GPU the largest job."""
    from puzzle.library.bld import BLDSettings, weight_train_flops
    from puzzle.library.ray_jobs import plan_jobs

    shape, space = ctx.shape, ctx.space
    device, dtype = ctx.runtime(args)
    given = {f.name: args[f.name] for f in fields(BLDSettings) if f.name in args}
    settings = BLDSettings(**{**given, "device": device, "dtype": dtype})
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
        parent_fwd = sum(shape.flops_per_token(shape.parent_block, T / 2, i) for i in range(max(job.layers) + 1))
        flops += steps * b * parent_fwd
        for v in job.variants:
            if v.is_parent or v.config.no_op:
                continue
            frozen = shape.matmul_params(shape.parent_ffn) if v.kind == "attention" else 0
            per_token = weight_train_flops(v.kind, shape.matmul_params(v.config), frozen)
            per_token += 3 * shape.attention_flops(v.config, T / 2, v.layer)
            flops += steps * b * per_token
            disk += shape.params(v.config) * DTYPE_BYTES[ctx.stored_dtype()]  # stored in the parent's dtype
    # A job's bytes (`bld_job_bytes`, what the build sizes jobs by) count the embedding table a CPU worker
    # only maps (`unread_bytes`): the estimate of its RSS leaves it out.
    peak = max(job.bytes for job in jobs) - unread_bytes(ctx, device, DTYPE_BYTES[dtype], logits=False, head=False)
    loaded = max(truncated_parent_bytes(shape, max(job.layers), DTYPE_BYTES[dtype]) for job in jobs)
    est = Estimate("", "build_library", disk_bytes=disk, flops=flops, workers=workers, dtype=dtype,
                   note=f"{len(jobs)} job(s) on {workers} worker(s) x {peak / GIB:.1f} GiB, {steps} steps of {b} tokens")
    if device == "cuda" and not budget and ctx.machine.gpu_bytes and peak > ctx.machine.gpu_bytes:
        est.note += "; set worker_memory_gib to split it into jobs that fit"
    return placed(est, device, loaded, peak, processes=workers)


def score_cost(ctx: Context, args: dict[str, Any]) -> Estimate:
    """score (puzzle/scoring/commands.py, replace1.py): load_puzzle(parent, dtype) on the host (P_e), then
    placed on its device. There: the parent P_e; per batch the parent's probabilities (b x V fp32), two
    (chunk_tokens, V) fp32 temporaries, the cached prefix and final hidden states (a few b x D in e), one
    library variant's weights (e); on the host the library entries kept after their first load
    (`store.LibraryReader`, at most `KEEP_LIBRARY` x P_e; none for a single batch). Each variant runs from
    its layer to the end (the prefix is reused). On the CPU less the weights it never reads (`unread_bytes`)."""
    from puzzle.scoring.commands import KEEP_LIBRARY

    shape, T = ctx.shape, ctx.seq_len
    device, dtype = ctx.runtime(args)
    e, b = DTYPE_BYTES[dtype], args["batch_size"] * T
    V, D, L = shape.vocab_size, shape.hidden_size, shape.num_hidden_layers
    largest = max(shape.params(v.config) for v in ctx.space.variants())
    working = (b * V + 2 * args["chunk_tokens"] * V) * FP32 + (4 * b * D + largest) * e + ctx.layer_activation_bytes(b, e)
    working -= unread_bytes(ctx, device, e, logits=True)
    batches = math.ceil(args["blocks"] / args["batch_size"])
    kept = KEEP_LIBRARY * ctx.model_bytes(e) if batches > 1 else 0  # a single batch uses each entry once
    per_token = shape.model_flops_per_token(None, T / 2)  # the parent reference
    head = shape.fixed_flops_per_token("lm_head")
    for v in ctx.space.variants():
        if not v.is_parent:
            rest = sum(shape.flops_per_token(shape.parent_block, T / 2, i) for i in range(v.layer + 1, L))
            per_token += shape.flops_per_token(v.config, T / 2, v.layer) + rest + head
    tokens = args["blocks"] * T
    rows = sum(1 for _ in ctx.space.variants()) * args["blocks"]
    est = Estimate("", "score", disk_bytes=rows * 128, flops=tokens * per_token, dtype=dtype)
    placed(est, device, load_peak_bytes(ctx, e), ctx.model_bytes(e) + working)
    est.host_bytes += kept
    return est


def profile_cost(ctx: Context, args: dict[str, Any]) -> Estimate:
    """profile (puzzle/profiling/commands.py, measure.py): the roofline is arithmetic (no model); `measure`
    (a CPU profile, or a GPU profile on a GPU) times each distinct variant alone in the workload's dtype,
    without gradients: one sublayer's weights cycled through COLD_BYTES of copies, a prefill input
    (B, input_len, D) and the sublayer's op outputs on it, and one layer's KV cache of decode_context
    tokens per sequence (a sliding-window layer caches at most its window: the largest layer's counts)."""
    from puzzle.profiling.hardware import load_profile
    from puzzle.profiling.measure import COLD_BYTES

    shape, profile = ctx.shape, load_profile(args["budget"])
    kind = profile.device.kind
    measured = args["measure"] if args["measure"] is not None else (kind == "cpu" or ctx.machine.device == "cuda")
    if not measured:
        return Estimate("", "profile", note=f"{profile.name}: roofline (no model)", seconds=0.0)
    w, e = profile.workload, DTYPE_BYTES[profile.workload.dtype]
    sublayer = max(shape.activation_bytes_per_token(p, e) for p in (shape.parent_attention, shape.parent_ffn))
    cached = max(shape.keys(i, w.decode_context) for i in range(shape.num_hidden_layers))
    held = (COLD_BYTES + sublayer * w.batch_size * w.input_len
            + shape.kv_cache_bytes_per_token(shape.parent_block, e) * w.batch_size * int(cached))
    distinct = {(v.kind, v.name): (v.config, v.layer) for v in ctx.space.variants()}
    flops = sum(args["repeats"] * w.batch_size * (shape.prefill_flops(c, w.input_len, i) + shape.flops_per_token(c, w.decode_context, i))
                for c, i in distinct.values())
    est = Estimate("", "profile", flops=flops, dtype=profile.workload.dtype,
                   note=f"{profile.name}: measured, {len(distinct)} variants")
    return placed(est, "cuda" if kind == "gpu" else "cpu", 0, held)


def solve_cost(ctx: Context, args: dict[str, Any]) -> Estimate:
    """solve: a MIP over (layers x variants) binaries, small: about MIP_SECONDS per solution (a sweep
    solves one per point), at most time_limit_s each."""
    count = args["num_solutions"]
    if args.get("sweep"):
        lo, hi, step = (float(x) for x in str(args["sweep"]).split(":"))
        count = int(round((hi - lo) / step)) + 1
    return Estimate("", "solve", host_bytes=PROCESS_BASELINE_BYTES, seconds=count * MIP_SECONDS,
                    note=f"{count} MIP(s), ~{MIP_SECONDS:.0f} s each assumed (<= {args['time_limit_s']:.0f} s)")


def realize_cost(ctx: Context, args: dict[str, Any]) -> Estimate:
    """realize (puzzle/realize/commands.py, assemble.py stream_child), on the host: the child built on the
    meta device and filled one sublayer at a time from the parent's safetensors and the library (the child,
    at most the parent's size, plus one sublayer), in `dtype` (auto: the parent's stored dtype), then
    streamed to safetensors from its own tensors (`save_model`; `atomic_save_bytes` on the host: nothing)."""
    dtype = ctx.stored_dtype() if args.get("dtype", "auto") == "auto" else ctx.runtime({"device": "cpu", **args})[1]
    child = ctx.model_bytes(DTYPE_BYTES[dtype])
    return Estimate("", "realize", host_bytes=PROCESS_BASELINE_BYTES + child, disk_bytes=child, dtype=dtype,
                    note=f"child <= parent, {dtype}")


def distill_cost(ctx: Context, args: dict[str, Any]) -> Estimate:
    """distill / GKD (puzzle/distill/commands.py, trainer.py, fsdp.py), the student priced from its config
    when it exists (`student_of`), else bounded by the parent, on `nproc` processes (FSDP2 over nproc
    ranks; one GPU each on CUDA), per rank, e the low dtype:
      teacher   load_model(dtype): P_e (on the CPU less what it never reads, `unread_bytes`), frozen;
                replicated on every rank unless it exceeds TEACHER_REPLICA_FRACTION of a rank's memory
                (`fsdp.shard_teacher`), then P_e / nproc
      student   fp32 master weights + gradient + 2 AdamW moments: 4 x P_fp32, / nproc under FSDP2; a mixed
                single process also holds autocast's e copies of the weights for the step (P_e); FSDP2
                gathers one layer's weights in e at a time (two with prefetch)
      per step  the student's activations of a micro-batch for backward: every layer's op outputs in e, or
                with gradient checkpointing (`gradient_checkpointing`, default on CUDA) each layer's input
                (b x D) plus one layer's op outputs recomputed; the teacher's final hidden states (b x D),
                two (chunk_tokens, V) fp32 logits chunks for the KL; with a hidden loss the teacher's hidden
                states of every layer (L + 1 of b x D)
      checkpoint  every checkpoint_every steps the student and then the 2 AdamW moments are streamed to
                safetensors (`atomic_save_bytes`: nothing from the host, one tensor at a time from a GPU) next
                to everything above but the activations (the freed gradients stay in the process: glibc
                keeps them); under FSDP2 `dcp.save` writes each rank's shard of weights + moments
                (3 x P_fp32 / nproc), staged once
    On CUDA the host holds per rank the baseline + max(the teacher it loads, the checkpoint it writes).
    cpu_offload (FSDP2's CPUOffloadPolicy on the student, any nproc; `offloaded_student`): the student's
    fp32 state moves from the GPU to the host; the GPU keeps the teacher, the units in flight and the
    activations; each step adds its copies and CPU AdamW step (`offload_step_seconds`) to the FLOPs' time.
    Disk: keep_checkpoints checkpoints (weights + 2 moments, fp32) and the final student."""
    from puzzle.distill.fsdp import shard_teacher

    shape, T, L, D = ctx.shape, ctx.seq_len, ctx.shape.num_hidden_layers, ctx.shape.hidden_size
    device, dtype = ctx.runtime(args)
    e, n = DTYPE_BYTES[dtype], max(1, int(args.get("nproc", 1)))
    offload = bool(args.get("cpu_offload"))
    checkpointing = args.get("gradient_checkpointing")
    checkpointing = device == "cuda" if checkpointing is None else bool(checkpointing)
    b = math.ceil(args["batch_size"] / n) * T  # the global batch split over the ranks
    Pe = ctx.model_bytes(e)  # the teacher (the parent)
    student_shape = student_of(args.get("student"))  # (shape, blocks) of a student that exists, else None
    P32 = student_shape[0].model_bytes(student_shape[1], FP32) if student_shape else ctx.parent_bytes
    rank_memory = ctx.machine.gpu_bytes if device == "cuda" else ctx.machine.host_bytes / n
    sharded = n > 1 and rank_memory and shard_teacher("auto", Pe, rank_memory)
    teacher = Pe / n if sharded else Pe - unread_bytes(ctx, device, e, logits=True)
    student = 4 * P32 / n
    if n > 1 or offload:
        student += 2 * shape.params(shape.parent_block) * e
    elif e != FP32:
        student += P32 * e // FP32  # autocast's e copies of the student's weights
    layer = ctx.layer_activation_bytes(b, e)
    act = (L * b * D * e + layer) if checkpointing else L * layer
    act += b * D * e + 2 * args["chunk_tokens"] * shape.vocab_size * FP32
    if args["hidden_loss"] != "none":
        act += (L + 1) * b * D * e
    save = atomic_save_bytes(shape, FP32, device) if n == 1 and not offload else 3 * P32 / n  # FSDP2 saves with DCP
    tokens = args["steps"] * args["grad_accum"] * args["batch_size"] * T
    forward = shape.model_flops_per_token(None, T / 2)
    val = math.ceil(args["steps"] / args["val_every"]) * args["val_blocks"] * T * 2 * forward
    est = Estimate("", "distill", disk_bytes=(3 * args["keep_checkpoints"] + 1) * P32, workers=n, dtype=dtype,
                   flops=tokens * (5 if checkpointing else 4) * forward + val,
                   note=("student: its config" if student_shape else "student <= parent")
                   + (", checkpointed" if checkpointing else "") + (f", FSDP2 x {n}" if n > 1 else "")
                   + (", CPU offload" if offload else ""))
    if device == "cuda" and offload:
        host, gpu = offloaded_student(shape, e, n)
        est.io_seconds = args["steps"] * offload_step_seconds(P32, n, math.ceil(args["grad_accum"] / n))
        return placed(est, device, max(P32 + Pe, host), teacher + gpu + act, processes=n)
    if device == "cuda":
        return placed(est, device, max(Pe, save), teacher + student + act, processes=n)
    return placed(est, device, 0, teacher + student + max(act, save), processes=n)


def student_of(student: Any) -> tuple[ModelShape, list | None] | None:
    """The shape and blocks (a puzzle child's; None for a plain model) of a GKD student that exists when
    planning (a standalone `puzzle distill --student DIR`, or a pipeline planned again after realize), from
    its config.json alone; None when it does not exist yet (the pipeline plans before realize: the student
    is then bounded by the parent)."""
    if not student or not (Path(student) / "config.json").is_file():
        return None
    from puzzle.model.checkpoint import load_config

    config = load_config(student)
    return ModelShape.from_config(config), getattr(config, "blocks", None)


def offloaded_student(shape: ModelShape, e: int, n: int) -> tuple[float, float]:
    """(host, GPU) bytes per rank of a parent-sized student trained by FSDP2 under CPUOffloadPolicy
    (puzzle/distill/fsdp.py `shard`, torch's _fsdp_param.py / _fsdp_collectives.py), e the compute dtype:
      host  the fp32 shards, their gradients and 2 AdamW moments (4 x P_fp32 / n; pinned on CUDA: page-locked,
            so the host must allow it) + the largest tensor `dcp.save` copies while it writes (the padded
            embedding shard: DCP writes host tensors in place and clones only a view of a larger storage)
      GPU   the root unit (embeddings, LM head, final norm), gathered for the whole step (FSDPRoot), and two
            decoder layers (the one computing and the one prefetched), each gathered in e from its fp32 shard
            copied to the GPU (+ 4 / n bytes per parameter); the layers' unsharded gradients in e and their
            fp32 copies for the reduce-scatter, one unit at a time (the root's is the largest)
    Loading (every rank: the student in fp32 and the teacher in e, before sharding and placing) is the caller's."""
    P32, root, layer = shape.model_bytes(None, FP32), shape.embedding_params + shape.hidden_size, shape.params(shape.parent_block)
    host = 4 * P32 / n + shape.fixed_params("embeddings") * FP32 / n
    gathered = (root + 2 * layer) * (e + FP32 / n)
    grads = max(root, layer) * (e + FP32)
    return host, gathered + grads


def offload_step_seconds(P32: float, n: int, micro_batches: int) -> float:
    """One optimizer step's offload time per rank (the ranks' copies run in parallel on their own links),
    not overlapped with compute (FSDP2 overlaps some: an upper bound): per micro-batch the rank's fp32 shards
    are copied to the GPU twice (forward and backward gathers) and its reduced gradient shards back
    (3 x P_fp32 / n over PCIe); then AdamW on the CPU reads weights, gradients and 2 moments and writes
    weights and moments (7 x P_fp32 / n of host memory traffic)."""
    return micro_batches * 3 * P32 / n / PCIE_BYTES_PER_S + 7 * P32 / n / HOST_BYTES_PER_S


def evaluate_cost(ctx: Context, args: dict[str, Any]) -> Estimate:
    """evaluate (puzzle/evaluate/commands.py, quality.py): load_model(dtype) of the model (<= P_e) and of
    the parent (P_e), each placed on the device after loading (the parent against itself: loaded once);
    per batch both models' logits and their log-softmax temporaries (fp32, b x V each) and one layer's
    activations (e)."""
    shape, T = ctx.shape, ctx.seq_len
    device, dtype = ctx.runtime(args)
    e, b = DTYPE_BYTES[dtype], args["batch_size"] * T
    model, parent = args.get("model"), args.get("parent")
    models = 1 if model is not None and parent is not None and Path(model).resolve() == Path(parent).resolve() else 2
    working = models * (ctx.model_bytes(e) - unread_bytes(ctx, device, e, logits=True))
    working += 4 * b * ctx.logits_bytes_per_token + ctx.layer_activation_bytes(b, e)
    flops = args["val_blocks"] * T * 2 * shape.model_flops_per_token(None, T / 2)
    est = Estimate("", "evaluate", flops=flops, dtype=dtype, note="model <= parent, next to the parent")
    return placed(est, device, load_peak_bytes(ctx, e), working)


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
    efficiency = profile.device.compute_efficiency
    rates = {k: v * efficiency for k, v in profile.device.peak_flops.items()}
    peaks = ", ".join(f"{k} {v / 1e12:.0f}" for k, v in profile.device.peak_flops.items())
    note = (f"{cpu_note}; GPU: {profile.name} peak TFLOP/s {peaks} x efficiency {efficiency} "
            "(each step at its dtype's rate)")
    count = gpus or (torch.cuda.device_count() if here else 1)
    return Machine("cuda", count, host, gpu_mem, cpu, max(rates.values()), note, rates)


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
        rate = m.gpu_rate(e.dtype) * max(1, min(e.workers, m.gpus)) if e.runs_on == "cuda" else m.cpu_flops
        e.seconds = e.flops / rate + e.io_seconds


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
        e = fn(ctx, stage_arguments(fns[step.fn], {**step.common, **step.args}))  # paths too: evaluate reads them
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
    lines = [f"parent: {shape.total_params() / 1e9:.3f}B parameters ({_gib(shape.model_bytes(None, FP32))} GiB in fp32, "
             f"{_gib(shape.model_bytes(None, DTYPE_BYTES['bf16']))} in bf16), "
             f"{shape.num_hidden_layers} layers, hidden {shape.hidden_size}",
             f"machine: {m.device}, {m.gpus} GPU(s) x {_gib(m.gpu_bytes)} GiB, host {_gib(m.host_bytes)} GiB",
             f"throughput: {m.throughput_note}", ""]
    head = f"{'step':<28} {'runs on':>12} {'workers':>7} {'host GiB':>9} {'GPU GiB':>8} {'disk GiB':>9} {'TFLOP':>10} {'time':>9}"
    lines += [head, "-" * len(head)]
    for e in estimates:
        lines.append(f"{e.step:<28} {e.runs_on + ' ' + e.dtype:>12} {e.workers:>7} {_gib(e.host_bytes):>9} {_gib(e.gpu_bytes):>8} "
                     f"{_gib(e.disk_bytes):>9} {e.flops / 1e12:>10.2f} {_duration(e.seconds):>9}  {e.note}")
    total = sum(e.seconds or 0 for e in estimates)
    lines += ["-" * len(head), f"{'total':<28} {'':>12} {'':>7} {_gib(max(e.host_bytes for e in estimates)):>9} "
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
    code runs it on the planned machine, in the dtype each step's --dtype resolves to there (auto: bf16 on
    CUDA, fp32 on the CPU). Prints a table and one warning line per step whose peak exceeds the memory
    given (or this machine's); exits 0 with warnings.

    Args:
        config: pipeline YAML (as for puzzle run)
        device: where the stages that can use a GPU run (auto: CUDA when this machine has one); a step's
            own device / dtype arguments in the config take precedence
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
