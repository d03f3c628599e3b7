"""`puzzle score` on Ray: the variants split by contiguous layer ranges, one generator task per range.

Each worker loads the whole parent (the reference needs every layer), receives the validation blocks and
the library files of its range through Ray's object store (puzzle/cluster.py: workers never open the run
directory), and per batch runs the parent reference once and the parent prefix up to its first layer once
(`replace1.score_batch` advances one hidden state through the parent's own layers), then each variant of its
range from its layer to the end. It yields each (variant, batch) result; the driver appends it to
`scores/partial.jsonl` (`ResultLog`) as the in-process path does, so a resumed or resubmitted job computes
only what is missing. Ranges are balanced by `split_layers` (puzzle/library/ray_jobs.py) on the cost of a
range: the prefix to its last layer plus, per variant at layer l, the N - l layers it runs again.
"""

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from puzzle import cluster
from puzzle.data.blocks import iterate_batches, load_blocks
from puzzle.device import DTYPES, place
from puzzle.footprint import Context
from puzzle.library import store
from puzzle.library.cost import split_layers
from puzzle.model.checkpoint import load_config, load_puzzle
from puzzle.run_dir import RunDir
from puzzle.scoring.cost import score_cost
from puzzle.scoring.replace1 import PARENT_KEY, Sums, score_results
from puzzle.search_space import Variant, build_search_space


@dataclass(frozen=True)
class ScoreJob:
    """One worker's range, as plain values: `todo` maps a batch index to the keys of the range's variants
    still to score on it; `parent_batches` are the batches whose parent row this job reports."""

    parent: str
    space_raw: dict
    space_name: str
    layers: tuple[int, ...]
    todo: dict[int, tuple[str, ...]]
    parent_batches: tuple[int, ...]
    blocks: int
    batch_size: int
    seed: int
    chunk_tokens: int
    device: str
    threads: int
    dtype: str = "fp32"  # the driver's `resolve_remote` name: every worker holds the parent in it


def layer_ranges(variants: list[Variant], num_layers: int, workers: int) -> list[list[int]]:
    """Contiguous ranges of the layers that have variants to run, balanced by scoring cost (see the module)."""
    cost: dict[int, float] = {}
    for v in variants:
        if not v.is_parent:
            cost[v.layer] = cost.get(v.layer, 0.0) + (num_layers - v.layer)
    return split_layers(sorted({v.layer for v in variants}), workers, [1.0] * num_layers, cost)


def score_task(job: ScoreJob, inputs: dict[str, bytes]) -> Iterator[dict[str, Any]]:
    """A Ray generator task: {"worker": `task_device()`}, then one {"result": ...} per (variant, batch) and
    per parent batch of `job.parent_batches`."""
    worker = cluster.task_device()
    yield {"worker": worker}
    if job.threads > 0:
        torch.set_num_threads(job.threads)
    device = worker["device"] if job.device == "auto" else job.device
    space = build_search_space(job.space_raw, load_config(job.parent), job.space_name)
    by_key = {store.key_of(v): v for v in space.variants() if v.layer in job.layers}
    todo = {b: [by_key[k] for k in keys] for b, keys in job.todo.items()}
    with cluster.unpacked(inputs) as work:
        model = place(load_puzzle(job.parent, dtype=DTYPES[job.dtype]), torch.device(device)).eval()
        batches = iterate_batches(load_blocks(work, "val"), job.batch_size, shuffle=True, seed=job.seed, limit=job.blocks)
        for key, batch, sums, variant in score_results(work, model, batches, todo, set(job.parent_batches), job.chunk_tokens):
            extra = {} if variant is None else {"layer": variant.layer, "kind": variant.kind, "variant": variant.name}
            yield {"result": (key, batch, sums.to_dict(), extra)}


def _inputs(run_dir: Path, job: ScoreJob, variants: dict[str, Variant]) -> list[str]:
    """Run-relative paths a job reads: the validation blocks, their meta, the manifest, its variants' files."""
    run = RunDir(run_dir)
    manifest = store.read_manifest(run_dir)["variants"]
    keys = {k for keys in job.todo.values() for k in keys}
    files = [store.library_dir(run_dir) / manifest[k]["file"] for k in keys
             if not variants[k].is_parent and not variants[k].config.no_op]
    paths = [run.data / "meta.json", run.data / "val.bin", store.manifest_path(run_dir), *files]
    return [p.relative_to(run_dir).as_posix() for p in paths]


def score_on_ray(run_dir: Path, jobs: list[ScoreJob], variants: dict[str, Variant], seq_len: int,
                 add: Callable[[str, int, Any, dict[str, Any]], None], remaining: Callable[[ScoreJob], ScoreJob],
                 max_retries: int) -> list[dict[str, Any]]:
    """Run the ranges as Ray tasks (Ray connected): preflight, requests from `scoring.cost.score_cost` (the job itself as its settings), each result
    handed to `add(key, batch, sums, extra)` as it arrives; a dead worker's job resubmitted as
    `remaining(job)` (what the driver has not received yet). Returns each job's worker record."""
    import ray

    info = cluster.preflight(run_dir, jobs[0].parent)
    config = load_config(jobs[0].parent)
    space = build_search_space(jobs[0].space_raw, config, jobs[0].space_name)
    use_gpu = jobs[0].device != "cpu"
    est = score_cost(Context.one_worker(config, space, seq_len, "cuda" if use_gpu else "cpu"), jobs[0])
    request = cluster.job_resources(est.host_bytes, est.gpu_bytes, jobs[0].threads, info, use_gpu=use_gpu)
    cluster.check_fits([[request]], info, "score")
    task = ray.remote(score_task).options(max_retries=0, runtime_env={"env_vars": {"TQDM_DISABLE": "1"}}, **request.options())
    workers: list[dict[str, Any]] = []

    def submit(job: ScoreJob) -> Any:
        job = remaining(job)
        return task.remote(job, cluster.ship(run_dir, _inputs(run_dir, job, variants)))

    def handle(job: ScoreJob, item: dict[str, Any]) -> None:
        if "worker" in item:
            workers.append({"layers": list(job.layers), "worker": item["worker"], "request": asdict(request)})
        if "result" in item:
            key, batch, sums, extra = item["result"]
            add(key, batch, Sums.from_dict(sums), extra)

    cluster.stream(jobs, submit, handle, max_retries, "score")
    return workers


def without(job: ScoreJob, done: Callable[[str, int], bool]) -> ScoreJob:
    """The job less the results `done(key, batch)` already holds."""
    todo = {b: tuple(k for k in keys if not done(k, b)) for b, keys in job.todo.items()}
    return replace(job, todo={b: keys for b, keys in todo.items() if keys},
                   parent_batches=tuple(b for b in job.parent_batches if not done(PARENT_KEY, b)))
