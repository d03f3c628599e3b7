"""Running a library build: layer groups as Ray tasks (or one after another in this process).

Each task owns a contiguous group of layers. It loads the parent and the data itself (from paths, so
nothing large travels through Ray), runs the parent once per batch up to its last layer, trains every
variant of its layers and writes each one as it finishes (`store.write_variant`). A task whose worker
dies is retried (`max_retries`); the retry, like any rerun, skips what the manifest already holds.
The driver shows one progress bar over all variants by polling the manifest.
"""

import math
import os
from itertools import accumulate
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from puzzle.errors import PuzzleError
from puzzle.library import store
from puzzle.library.bld import BLDSettings, build_layer_group, group_variants, weight_train_flops
from puzzle.search_space import SearchSpace, build_search_space
from puzzle.shape import ModelShape

@dataclass(frozen=True)
class GroupJob:
    """Everything a worker needs for one layer group, as plain values (Ray ships it to the worker)."""

    run_dir: str
    parent: str
    space_raw: dict
    space_name: str
    layers: tuple[int, ...]
    settings: dict
    threads: int


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


def layer_costs(space: SearchSpace, config: Any, settings: BLDSettings) -> tuple[list[float], dict[int, float]]:
    """Estimated FLOPs, per layer, of the two kinds of work in a group (for `split_layers`).

    forward[l]: the parent's layer l (2 x its weights per token) on the training, calibration and
    held-out tokens. train[l]: `weight_train_flops` of each trained variant of layer l, on the training
    tokens. Attention scores are left out (small at BLD's sequence lengths). On the quick config this
    predicts forward / train = 0.35 per layer; the `group_done` events of two quick runs' library logs
    measured 0.36-0.44 (seconds of parent forward and calibration per layer / seconds of training per layer).
    """
    shape = ModelShape.from_config(config)
    layer = shape.params(space.parent_attention) + shape.params(space.parent_ffn)
    forward_tokens = settings.tokens_per_block + settings.calibration_tokens + settings.eval_tokens
    forward = [2.0 * layer * forward_tokens] * space.num_layers
    frozen_ffn = shape.params(space.parent_ffn)
    train: dict[int, float] = {}
    for v in space.variants():
        if v.is_parent or v.config.no_op:
            continue
        flops = weight_train_flops(v.kind, shape.params(v.config), frozen_ffn)
        train[v.layer] = train.get(v.layer, 0.0) + flops * settings.tokens_per_block
    return forward, train


def load_neuron_importance(run_dir: str | Path) -> dict[int, torch.Tensor] | None:
    """Minitron neuron scores per layer (`layers.{i}.neurons` of `puzzle importance`), or None when the run
    has none (complete) yet."""
    from puzzle.pruning.importance import has_importance, load_importance

    if not has_importance(run_dir):
        return None
    scores = {}
    for key, value in load_importance(run_dir).items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] == "neurons":
            scores[int(parts[1])] = value.float()
    return scores or None


def _load_data(run_dir: str | Path) -> tuple[Any, Any]:
    """Training blocks and held-out blocks (the validation split, or the last train blocks without one)."""
    from puzzle.data.blocks import load_blocks, load_meta

    train = load_blocks(run_dir, "train")
    meta = load_meta(run_dir)
    if int(meta.get("n_val_blocks", 0)) > 0:
        return train, load_blocks(run_dir, "val")
    if len(train) < 2:
        raise PuzzleError(f"{run_dir}: too little prepared data for the block library; prepare more text")
    held = max(1, len(train) // 10)
    return train[:-held], train[-held:]


def _already_done(job: GroupJob) -> dict[str, Any] | None:
    """A summary when the library already holds every variant of the job's layers (no weights loaded)."""
    from puzzle.model.checkpoint import load_config

    variants = group_variants(build_search_space(job.space_raw, load_config(job.parent), job.space_name), job.layers)
    if store.missing_variants(job.run_dir, variants, settings_sha256=BLDSettings(**job.settings).digest(job.run_dir)):
        return None
    return {"layers": list(job.layers), "skipped": len(variants), "trained": 0, "recorded": 0}


def _inputs(job: GroupJob) -> tuple[BLDSettings, dict[int, torch.Tensor] | None, tuple[Any, Any]]:
    settings = BLDSettings(**job.settings)
    scores = load_neuron_importance(job.run_dir) if settings.ffn_init != "channel_contribution" else None
    return settings, scores, _load_data(job.run_dir)


def run_group(job: GroupJob) -> dict[str, Any]:
    """One worker's whole job: skip what is done, else load the parent and data and run BLD on its layers."""
    from puzzle.model.checkpoint import load_model, to_puzzle

    if job.threads > 0:
        torch.set_num_threads(job.threads)
    if (done := _already_done(job)) is not None:
        return done
    parent = to_puzzle(load_model(job.parent))
    space = build_search_space(job.space_raw, parent.config, job.space_name)
    settings, scores, (train, held_out) = _inputs(job)
    return build_layer_group(job.run_dir, parent, space, job.layers, train, held_out, settings, scores)


def _count_done(run_dir: str | Path, keys: set[str]) -> int:
    try:
        return len(keys & set(store.read_manifest(run_dir)["variants"]))
    except PuzzleError:  # read while being replaced on a filesystem without atomic rename: try again later
        return -1


def run_in_process(jobs: list[GroupJob], progress: Callable[[int], None]) -> list[dict[str, Any]]:
    """The groups one after another in this process (no Ray): for debugging, tests and single machines."""
    if not jobs:
        return []
    threads = torch.get_num_threads()
    try:
        return _run_jobs_here(jobs, progress)
    finally:
        torch.set_num_threads(threads)


def _run_jobs_here(jobs: list[GroupJob], progress: Callable[[int], None]) -> list[dict[str, Any]]:
    from puzzle.model.checkpoint import load_model, to_puzzle

    results, parent = [], None
    for job in jobs:
        if job.threads > 0:
            torch.set_num_threads(job.threads)
        if (done := _already_done(job)) is not None:
            results.append(done)
            continue
        if parent is None:  # loaded once, for the first group with work left
            parent = to_puzzle(load_model(job.parent))
            settings, scores, (train, held_out) = _inputs(job)
        space = build_search_space(job.space_raw, parent.config, job.space_name)
        results.append(build_layer_group(job.run_dir, parent, space, job.layers, train, held_out, settings, scores, progress))
    return results


def run_on_ray(
    jobs: list[GroupJob], address: str | None, max_retries: int, poll: Callable[[], None], poll_s: float = 1.0
) -> list[dict[str, Any]]:
    """The groups as Ray tasks: `ray.init(address)` unless Ray is already initialised in this process
    (None: RAY_ADDRESS, else the local cluster `ray start` left, else a new embedded one)."""
    import ray
    from ray.exceptions import RayTaskError, WorkerCrashedError

    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise PuzzleError(f"cannot reach the Ray cluster at {address or os.environ.get('RAY_ADDRESS')}: {err}") from None
    try:
        task = ray.remote(run_group)
        # Workers report progress through the manifest the driver polls; their own bars (transformers' GGUF
        # conversion, once per worker) would only interleave in the driver's log. env_vars merge with the job's.
        quiet = {"env_vars": {"TQDM_DISABLE": "1"}}
        refs = [task.options(num_cpus=max(job.threads, 1), max_retries=max_retries, retry_exceptions=False,
                             runtime_env=quiet).remote(job) for job in jobs]
        results, pending = [], list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=poll_s)
            poll()
            for ref in ready:
                try:
                    results.append(ray.get(ref))
                except RayTaskError as err:
                    if isinstance(err.cause, PuzzleError):
                        raise err.cause from None
                    raise
                except WorkerCrashedError:
                    raise PuzzleError(
                        f"a library worker died {max_retries + 1} times; rerun puzzle build-library to resume"
                    ) from None
        return results
    finally:
        if started_here:
            ray.shutdown()


def run_build(
    jobs: list[GroupJob], space: SearchSpace, run_dir: Path, use_ray: bool, address: str | None, max_retries: int,
    settings_sha256: str | None = None,
) -> list[dict[str, Any]]:
    """Run every job with one progress bar over all variants of the jobs' layers (a variant trained under
    other settings than `settings_sha256`, `BLDSettings.digest`, counts as missing)."""
    layers = sorted({layer for job in jobs for layer in job.layers})
    keys = {store.key_of(v) for v in group_variants(space, layers)}
    missing = store.missing_variants(run_dir, group_variants(space, layers), settings_sha256=settings_sha256)
    done, missing_layers = len(keys) - len(missing), {v.layer for v in missing}
    # a group with nothing left is answered here: a finished build starts no Ray (15-28 s) and loads nothing
    finished = [job for job in jobs if not missing_layers & set(job.layers)]
    jobs = [job for job in jobs if missing_layers & set(job.layers)]
    results = [{"layers": list(job.layers), "skipped": len(group_variants(space, job.layers)), "trained": 0,
                "recorded": 0} for job in finished]
    t0 = time.perf_counter()
    with tqdm(total=len(keys), initial=done, desc="block library", unit="variant", dynamic_ncols=True) as bar:
        if jobs and use_ray:

            def poll() -> None:
                n = _count_done(run_dir, keys)
                if n > bar.n:
                    bar.update(n - bar.n)

            results += run_on_ray(jobs, address, max_retries, poll)
            poll()
        elif jobs:
            results += run_in_process(jobs, bar.update)
    store.library_log(run_dir).write(event="build_done", groups=len(jobs), wall_s=time.perf_counter() - t0)
    return sorted(results, key=lambda r: r["layers"])
