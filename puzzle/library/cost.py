"""build-library's cost model: a BLD job's bytes, its FLOPs, the worker split, the jobs of a budgeted build,
the Ray request of one job and the `puzzle plan` estimate of the whole build. One arithmetic for all of
them: the build sizes and places its jobs with the functions `puzzle plan` prices them with, and BLD's own
FLOP accounting (bld.py `train_lockstep`, read by scripts/bench_library.py) counts with the same two
per-token functions (`variant_train_flops`, `parent_layer_flops`)."""

import math
from dataclasses import dataclass
from itertools import accumulate
from types import SimpleNamespace
from typing import Any, Protocol, Sequence

from puzzle.errors import PuzzleError
from puzzle.footprint import DTYPE_BYTES, FP32, GIB, PROCESS_BASELINE_BYTES, Context, Estimate, placed, unread_bytes
from puzzle.library import store
from puzzle.search_space import SearchSpace, Variant
from puzzle.shape import ModelShape


class Recipe(Protocol):
    """What the cost model reads of a BLD run: `build_library`'s own parameters of these names (the plan's
    `stage_settings`) or the `BLDSettings` a build made of them (a Ray job's); `dtype` resolved (fp32, bf16, fp16)."""

    tokens_per_block: int
    batch_size: int
    seq_len: int | None
    calibration_tokens: int
    eval_tokens: int
    device: str
    dtype: str


def group_variants(space: SearchSpace, layers: Sequence[int]) -> list[Variant]:
    """The variants of `layers`, in the space's order (layer by layer)."""
    owned = set(layers)
    return [v for v in space.variants() if v.layer in owned]


def steps(recipe: Recipe, seq_len: int) -> int:
    """Optimizer steps of each variant: tokens_per_block in batches of batch_size x seq_len tokens."""
    return max(1, math.ceil(recipe.tokens_per_block / (recipe.batch_size * seq_len)))


# ----- FLOPs: the one arithmetic -----------------------------------------------------------------------


def variant_train_flops(shape: ModelShape, variant: Variant, seq_len: int) -> float:
    """Training FLOPs per token of one variant (0 for the parent's own and no-ops: measured, not trained):
    6 x its matmul weights (forward + both backward matmuls), and for an attention variant the layer's
    frozen parent FFN's forward plus its input-gradient backward (4 x its matmul weights) and its scores:
    forward + 2x backward, each query over seq_len / 2 keys on average under the causal mask (at most the
    variant's sliding window). A least-squares linear FFN also costs 6 x its weights: X^T X and X^T Y
    (2 D^2 each) and its forward for the batch loss."""
    if variant.is_parent or variant.config.no_op:
        return 0.0
    flops = 6 * shape.matmul_params(variant.config)
    if variant.kind == "attention":
        flops += 4 * shape.matmul_params(shape.parent_blocks[variant.layer].ffn) + 3 * shape.attention_flops(variant.config, seq_len / 2)
    return float(flops)


def parent_layer_flops(shape: ModelShape, layer: int, seq_len: int) -> float:
    """Forward FLOPs per token of the parent's decoder layer `layer` (queries over seq_len / 2 keys, at most
    its window): a job runs every layer up to its last one, once per batch."""
    return shape.flops_per_token(shape.parent_blocks[layer], seq_len / 2)


def parent_forward_flops(shape: ModelShape, last_layer: int, seq_len: int) -> float:
    """Forward FLOPs per token of the parent's layers 0..last_layer."""
    return sum(parent_layer_flops(shape, i, seq_len) for i in range(last_layer + 1))


# ----- bytes ---------------------------------------------------------------------------------------------


def truncated_parent_bytes(shape: ModelShape, last_layer: int, dtype_bytes: int = FP32) -> int:
    """A BLD worker's parent (`load_puzzle(last_layer=...)`): the embeddings and layers 0..last_layer, no
    head, no final norm, read once from safetensors onto the meta-built model, in the training's low dtype."""
    return (shape.fixed_params("embeddings") + shape.layer_params(shape.parent_blocks[:last_layer + 1])) * dtype_bytes


def bld_job_bytes(shape: ModelShape, layers: list[int], variants: list[Any], settings: Recipe, seq_len: int) -> int:
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


# ----- the jobs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobPlan:
    """One job of a build: `variants` of the contiguous `layers`, and its estimated bytes (`bld_job_bytes`).
    `whole`: the job holds every variant of its layers (no subset)."""

    layers: tuple[int, ...]
    variants: tuple[Variant, ...]
    bytes: int
    whole: bool = True

    @property
    def keys(self) -> tuple[str, ...]:
        return () if self.whole else tuple(store.key_of(v) for v in self.variants)


def split_layers(layers: list[int], groups: int, forward: list[float] | None = None,
                 train: dict[int, float] | None = None) -> list[list[int]]:
    """Contiguous groups of `layers` for the workers.

    Without costs: groups of nearly equal size. With them, the split that minimises the largest group's
    cost, where a group costs the parent's forward through every layer up to its last one
    (sum of forward[0..last]) plus the training of its own layers (sum of train[l]). A later group runs
    the parent further, so with costs the early groups take more layers.
    """
    groups = max(1, min(groups, len(layers)))
    if forward is None or train is None:
        size = math.ceil(len(layers) / groups)
        return [layers[i : i + size] for i in range(0, len(layers), size)]
    reach = list(accumulate(forward, initial=0.0))  # reach[l + 1]: the parent's forward through layer l
    trained = list(accumulate((train.get(layer, 0.0) for layer in layers), initial=0.0))

    def cost(i: int, j: int) -> float:  # the group layers[i:j]
        return reach[layers[j - 1] + 1] + trained[j] - trained[i]

    n = len(layers)
    # best[k][j]: the smallest largest cost of splitting layers[:j] into k groups; cut[k][j]: where the last starts
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(groups + 1)]
    cut = [[0] * (n + 1) for _ in range(groups + 1)]
    best[0][0] = 0.0
    for k in range(1, groups + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                c = max(best[k - 1][i], cost(i, j))
                if c < best[k][j]:
                    best[k][j], cut[k][j] = c, i
    bounds, j = [], n
    for k in range(groups, 0, -1):
        bounds.append((cut[k][j], j))
        j = cut[k][j]
    return [layers[i:j] for i, j in reversed(bounds)]


def layer_costs(space: SearchSpace, config: Any, settings: Recipe, seq_len: int) -> tuple[list[float], dict[int, float]]:
    """Estimated FLOPs, per layer, of the two kinds of work in a group (for `split_layers`).

    forward[l]: the parent's layer l (`parent_layer_flops`) on the training, calibration and held-out
    tokens. train[l]: `variant_train_flops` of each trained variant of layer l, on the training tokens. On
    the quick config this predicts forward / train = 0.35 per layer (before attention's scores were counted:
    small at BLD's sequence lengths); the `group_done` events of two quick runs' library logs measured
    0.36-0.44 (seconds of parent forward and calibration per layer / seconds of training per layer).
    """
    shape = ModelShape.from_config(config)
    forward_tokens = settings.tokens_per_block + settings.calibration_tokens + settings.eval_tokens
    forward = [parent_layer_flops(shape, i, seq_len) * forward_tokens for i in range(space.num_layers)]
    train: dict[int, float] = {}
    for v in space.variants():
        if flops := variant_train_flops(shape, v, seq_len):
            train[v.layer] = train.get(v.layer, 0.0) + flops * settings.tokens_per_block
    return forward, train


def plan_jobs(space: SearchSpace, config: Any, settings: Recipe, layers: list[int], workers: int, seq_len: int,
              budget_bytes: float | None = None) -> list[JobPlan]:
    """The build's jobs: contiguous layer groups, one per worker (`split_layers` over `layer_costs`); with a
    per-worker `budget_bytes`, a group whose estimate (`bld_job_bytes`) exceeds it is split into consecutive
    variant subsets, each as large as fits. A subset covers the layers of its variants only, so its parent
    stops at its own last layer. Without a budget: today's groups."""
    shape = ModelShape.from_config(config)

    def job(variants: list[Variant], whole: bool) -> JobPlan:
        own = tuple(sorted({v.layer for v in variants}))
        return JobPlan(own, tuple(variants), bld_job_bytes(shape, list(own), variants, settings, seq_len), whole)

    plans = []
    for group in split_layers(layers, workers, *layer_costs(space, config, settings, seq_len)):
        whole = job(group_variants(space, group), True)
        if budget_bytes is None or whole.bytes <= budget_bytes:
            plans.append(JobPlan(tuple(group), whole.variants, whole.bytes))
            continue
        current: list[Variant] = []
        for v in whole.variants:  # layer order: a subset's layers stay contiguous
            if current and job(current + [v], False).bytes > budget_bytes:
                plans.append(job(current, False))
                current = []
            current.append(v)
        plans.append(job(current, False))
    over = [p for p in plans if budget_bytes is not None and p.bytes > budget_bytes]
    if over:
        worst = max(over, key=lambda p: p.bytes)
        raise PuzzleError(f"BLD of {store.key_of(worst.variants[0])} alone needs ~{worst.bytes / GIB:.2f} GiB; "
                          f"raise --worker-memory-gib to at least {math.ceil(worst.bytes / GIB * 100) / 100:.2f}")
    return plans


def worker_estimate(ctx: Context, job: JobPlan, settings: Recipe) -> Estimate:
    """One job's worker process, the rule both the plan and the job's Ray request (ray_jobs.job_requests)
    follow: on the CPU the host holds the baseline + the job's bytes, less the embedding table a CPU worker
    only maps (`unread_bytes`); on CUDA the GPU holds the job's bytes and the host the baseline + the
    truncated parent it loads before placing it."""
    device, dtype = ctx.runtime(settings.device, settings.dtype)
    e = DTYPE_BYTES[dtype]
    peak = job.bytes - unread_bytes(ctx, device, e, logits=False, head=False)
    loaded = truncated_parent_bytes(ctx.shape, max(job.layers), e)
    return placed(Estimate("", "build_library", dtype=dtype), device, loaded, peak)


def build_library_cost(ctx: Context, s: Any) -> Estimate:
    """build-library (`s`: its arguments): the jobs the build itself plans (`plan_jobs`: contiguous layer
    groups, one per worker, each split into variant subsets that fit `worker_memory_gib` when one is given),
    each a `worker_estimate`. Workers run side by side (one GPU each on CUDA): the host holds one worker
    process per worker running at once, each as large as the largest job's; each GPU the largest job."""
    shape, space = ctx.shape, ctx.space
    device, dtype = ctx.runtime(s.device, s.dtype)
    recipe = SimpleNamespace(**{**vars(s), "device": device, "dtype": dtype})
    T = s.seq_len or ctx.seq_len
    b = s.batch_size * T
    layers = sorted(set(s.layers or range(shape.num_hidden_layers)))
    budget = s.worker_memory_gib
    requested = s.workers  # "auto": one per GPU of the planned machine (`puzzle.cluster.auto_workers`)
    requested = (ctx.machine.gpus or 1) if requested == "auto" else int(requested) or 1
    jobs = plan_jobs(space, ctx.config, recipe, layers, requested, T, budget * GIB if budget else None)
    workers = min(len(jobs), requested)
    n_steps = steps(recipe, T)

    flops = disk = 0.0
    for job in jobs:
        flops += n_steps * b * parent_forward_flops(shape, max(job.layers), T)
        for v in job.variants:
            flops += n_steps * b * variant_train_flops(shape, v, T)
            if not (v.is_parent or v.config.no_op):
                disk += shape.params(v.config) * DTYPE_BYTES[ctx.stored_dtype()]  # stored in the parent's dtype
    per_worker = [worker_estimate(ctx, job, recipe) for job in jobs]
    peak = max(w.gpu_bytes if device == "cuda" else w.host_bytes - PROCESS_BASELINE_BYTES for w in per_worker)
    est = Estimate("", "build_library", disk_bytes=disk, flops=flops, workers=workers, dtype=dtype,
                   host_bytes=workers * max(w.host_bytes for w in per_worker), runs_on=device,
                   gpu_bytes=max(w.gpu_bytes for w in per_worker),
                   note=f"{len(jobs)} job(s) on {workers} worker(s) x {peak / GIB:.1f} GiB, "
                        f"{n_steps} steps of {b} tokens")
    if device == "cuda" and not budget and ctx.machine.gpu_bytes and peak > ctx.machine.gpu_bytes:
        est.note += "; set worker_memory_gib to split it into jobs that fit"
    return est
