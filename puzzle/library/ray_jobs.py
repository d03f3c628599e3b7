"""Running a library build: layer groups as Ray tasks (or one after another in this process).

Each task owns a contiguous group of layers (and, under a per-worker memory budget, a subset of their
variants: `plan_jobs`). It loads the parent itself (from its path): only the embeddings and the layers up
to its last one, read from the parent's safetensors (`load_puzzle(last_layer=...)`). It receives the
prepared data and importance scores through Ray's object store (`bld_task`, puzzle/cluster.py: workers
never open the run directory), runs that parent once per batch, trains the job's variants and streams
each one back as it finishes, in the parent's dtype; the driver writes it (`store.receive_variant`) and
advances one progress bar over all variants. A job whose worker dies is submitted again without the
variants the driver already holds.
"""

import json
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from puzzle import cluster
from puzzle.data.blocks import load_blocks, load_meta
from puzzle.device import DTYPES
from puzzle.errors import PuzzleError
from puzzle.footprint import Context
from puzzle.library import store
from puzzle.library.bld import BLDSettings, build_layer_group
from puzzle.library.cost import JobPlan, bld_job_bytes, group_variants, worker_estimate
from puzzle.model.checkpoint import load_config, load_puzzle, weights_dtype
from puzzle.pruning.importance import has_importance, load_importance
from puzzle.run_dir import RunDir
from puzzle.search_space import SearchSpace, Variant, build_search_space


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
    variants: tuple[str, ...] = ()  # `store.key_of` of the variants to build; empty: every variant of `layers`


def load_neuron_importance(run_dir: str | Path, field: str = "neurons") -> dict[int, torch.Tensor] | None:
    """Minitron neuron scores per layer (`layers.{i}.neurons` of `puzzle importance`), or None when the run
    has none (complete) yet. `field` "experts.output": an MoE layer's expert scores (E,) (`layers.{i}.experts.output`,
    the router statistics `puzzle importance` records for an MoE parent: the router's weight times what each
    expert adds, over the tokens routed to it), which choose the experts an MoE variant keeps (init_moe_ffn)."""
    if not has_importance(run_dir):
        return None
    scores = {}
    for key, value in load_importance(run_dir).items():
        layer, _, rest = key.removeprefix("layers.").partition(".")
        if key.startswith("layers.") and layer.isdigit() and rest == field:
            scores[int(layer)] = value.float()
    return scores or None


def _load_data(run_dir: str | Path) -> tuple[Any, Any]:
    """Training blocks and held-out blocks (the validation split, or the last train blocks without one)."""
    train = load_blocks(run_dir, "train")
    meta = load_meta(run_dir)
    if int(meta.get("n_val_blocks", 0)) > 0:
        return train, load_blocks(run_dir, "val")
    if len(train) < 2:
        raise PuzzleError(f"{run_dir}: too little prepared data for the block library; prepare more text")
    held = max(1, len(train) // 10)
    return train[:-held], train[-held:]


def job_variants(job: GroupJob, space: SearchSpace) -> list[Variant]:
    """The variants a job builds: its subset, or every variant of its layers."""
    variants = group_variants(space, job.layers)
    return [v for v in variants if store.key_of(v) in set(job.variants)] if job.variants else variants


def _job_space(job: GroupJob) -> SearchSpace:
    """The search space over the parent's whole config (a worker's parent model is truncated)."""
    return build_search_space(job.space_raw, load_config(job.parent), job.space_name)


def _already_done(job: GroupJob, space: SearchSpace) -> dict[str, Any] | None:
    """A summary when the library already holds every variant of the job (no weights loaded)."""
    variants = job_variants(job, space)
    if store.missing_variants(job.run_dir, variants, settings_sha256=BLDSettings(**job.settings).digest(job.run_dir)):
        return None
    return {"layers": list(job.layers), "skipped": len(variants), "trained": 0, "recorded": 0}


def _load_parent(job: GroupJob, last_layer: int) -> Any:
    """The parent truncated after `last_layer`: embeddings and layers 0..last_layer read from its safetensors
    (`load_puzzle`), nothing beyond."""
    dtype = DTYPES[job.settings.get("dtype", "fp32")]  # held once in the training's low dtype (bf16 under --dtype bf16)
    return load_puzzle(job.parent, dtype=dtype, last_layer=last_layer).requires_grad_(False)


def _inputs(job: GroupJob) -> tuple[BLDSettings, dict[int, torch.Tensor] | None, tuple[Any, Any],
                                    dict[int, torch.Tensor] | None]:
    settings = BLDSettings(**job.settings)
    # importance-based inits only where the settings' digest includes the importance (BLDSettings.digest)
    use = settings.ffn_init != "channel_contribution"
    scores = load_neuron_importance(job.run_dir) if use else None
    experts = load_neuron_importance(job.run_dir, "experts.output") if use else None  # pruning/experts.py's default criterion
    return settings, scores, _load_data(job.run_dir), experts


def _build(job: GroupJob, parent: Any, space: SearchSpace, inputs: tuple, progress: Callable[[int], None] | None = None
           ) -> dict[str, Any]:
    settings, scores, (train, held_out), experts = inputs
    return build_layer_group(job.run_dir, parent, space, job.layers, train, held_out, settings, scores, progress,
                             only=job.variants or None, store_dtype=weights_dtype(job.parent), expert_scores=experts)


def run_group(job: GroupJob) -> dict[str, Any]:
    """One worker's whole job: skip what is done, else load the parent up to the job's last layer and the
    data, and run BLD on the job's variants."""
    if job.threads > 0:
        torch.set_num_threads(job.threads)
    space = _job_space(job)
    if (done := _already_done(job, space)) is not None:
        return done
    return _build(job, _load_parent(job, max(job.layers)), space, _inputs(job))


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
    results, parent, inputs = [], None, None
    space = _job_space(jobs[0])
    for job in jobs:
        if job.threads > 0:
            torch.set_num_threads(job.threads)
        if (done := _already_done(job, space)) is not None:
            results.append(done)
            continue
        if parent is None:  # loaded once, for the first job with work left, up to the last layer any job needs
            parent = _load_parent(job, max(layer for j in jobs for layer in j.layers))
            inputs = _inputs(job)
        results.append(_build(job, parent, space, inputs, progress))
    return results


def bld_task(job: GroupJob, inputs: dict[str, bytes], seed: dict[str, bytes]) -> Iterator[dict[str, Any]]:
    """A Ray generator task: `run_group` on a private run directory holding the shipped `inputs` (prepared
    data, importance) and `seed` (the driver's manifest and the group's finished files, so a resubmitted
    job skips them). Yields {"worker": `task_device()`} first, then {"log": [...], "variants": [(record,
    bytes or None)]} as variants finish, then {"summary": ...} (see puzzle/cluster.py, Transport)."""
    worker = cluster.task_device()
    yield {"worker": worker}
    if job.settings.get("device", "cpu") != "cpu":  # cuda or auto: the GPU Ray assigned (the CPU if none)
        job = replace(job, settings={**job.settings, "device": worker["device"]})
    with cluster.unpacked(inputs, seed) as work:
        yield from _follow(work, lambda: run_group(replace(job, run_dir=str(work))))


def _follow(work: Path, fn: Callable[[], dict[str, Any]], tick_s: float = 0.25) -> Iterator[dict[str, Any]]:
    """Run `fn` (which writes library variants and log lines into `work`) in a thread; every `tick_s` yield
    what it wrote since the last look (whole log lines; manifest records with their files' bytes), then its
    result. A record goes out one tick after it was first seen, with the log read after it: bld writes a
    variant's file, its record, then its `variant_done` line, so the line travels with (or before) it and a
    worker killed in between loses both (its job, resubmitted, trains the variant once more) or neither."""
    shipped = set(store.read_manifest(work)["variants"])  # seeded: the driver holds them
    log_path, offset = store.library_log(work).path, 0
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as err:  # raised again below, in the task's own thread
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    pending: dict[str, dict[str, Any]] = {}
    while True:
        thread.join(timeout=tick_s)
        alive = thread.is_alive()
        seen = {k: r for k, r in store.read_manifest(work)["variants"].items() if k not in shipped}
        lines, offset = _new_lines(log_path, offset)
        ready = {k: r for k, r in seen.items() if k in pending or not alive}
        pending = {k: r for k, r in seen.items() if k not in ready}
        shipped |= set(ready)
        variants = [(r, (store.library_dir(work) / r["file"]).read_bytes() if r.get("source") == "trained" else None)
                    for r in ready.values()]
        if lines or variants:
            yield {"log": lines, "variants": variants}
        if not alive:
            break
    if "error" in box:
        raise box["error"]
    yield {"summary": box["result"]}


def _new_lines(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The whole JSON lines of `path` after byte `offset`, and the offset after them."""
    if not path.exists():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    lines = []
    for line in data[:end].splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines, offset + end


def _seed(run_dir: Path, job: GroupJob) -> dict[str, bytes]:
    """The driver's manifest and the files of the job's trained variants it holds, as run-relative bytes."""
    manifest = store.manifest_path(run_dir)
    rels = [manifest.relative_to(run_dir).as_posix()] if manifest.exists() else []
    for record in store.read_manifest(run_dir)["variants"].values():
        if record.get("layer") in job.layers and record.get("source") == "trained":
            rels.append((store.library_dir(run_dir) / record["file"]).relative_to(run_dir).as_posix())
    return {rel: (run_dir / rel).read_bytes() for rel in rels if (run_dir / rel).is_file()}


def job_requests(jobs: list[GroupJob], space: SearchSpace, info: cluster.ClusterInfo) -> list[cluster.Resources]:
    """Each job's Ray request: its variants' bytes (`bld_job_bytes`, as `plan_jobs` sized them) in one worker
    process as `puzzle plan` prices it (`library.cost.worker_estimate`: the process baseline included; on a
    GPU the job's bytes on it and the loaded truncated parent on the host). A job runs on a GPU when the
    cluster has one and its settings ask for one (cuda, or auto: the GPU Ray assigns)."""
    config = load_config(jobs[0].parent) if jobs else None
    requests = []
    for job in jobs:
        settings = BLDSettings(**job.settings)
        seq_len = settings.seq_len or int(load_meta(job.run_dir)["seq_len"])
        gpu = info.gpus > 0 and settings.device != "cpu"
        ctx = Context.one_worker(config, space, seq_len, "cuda" if gpu else "cpu")
        variants = job_variants(job, space)
        plan = JobPlan(job.layers, tuple(variants), bld_job_bytes(ctx.shape, list(job.layers), variants, settings, seq_len))
        est = worker_estimate(ctx, plan, settings)
        requests.append(cluster.job_resources(est.host_bytes, est.gpu_bytes, job.threads, info, use_gpu=gpu))
    return requests


def run_on_ray(jobs: list[GroupJob], space: SearchSpace, run_dir: Path, max_retries: int,
               progress: Callable[[int], None]) -> list[dict[str, Any]]:
    """The groups as Ray generator tasks (Ray must be connected: `cluster.connected`): preflight, each job's
    request from its estimate, jobs of one layer group placed together, inputs shipped once, results
    written here as they arrive, a dead worker's job resubmitted (puzzle/cluster.py)."""
    import ray

    info = cluster.preflight(run_dir, jobs[0].parent)
    requests = job_requests(jobs, space, info)
    keys = [job.layers for job in jobs]
    cluster.check_fits([[r for k, r in zip(keys, requests) if k == key] for key in dict.fromkeys(keys)], info, "library")
    run = RunDir(run_dir)
    # parent.json too: BLDSettings.digest reads the parent's fingerprint from it
    inputs = cluster.ship(run_dir, [run.info_file.name] + cluster.run_files(run_dir, run.data)
                          + cluster.run_files(run_dir, run.importance))
    placed, groups = cluster.placement(keys, requests)
    # Workers report progress by what they yield; their own bars (transformers' GGUF conversion, once per
    # worker) would only interleave in the driver's log. env_vars merge with the job's.
    task = ray.remote(bld_task)
    quiet = {"env_vars": {"TQDM_DISABLE": "1"}}
    index = {id(job): i for i, job in enumerate(jobs)}
    log = store.library_log(run_dir)
    workers: dict[int, dict[str, Any]] = {}
    received: dict[int, list[int]] = {id(job): [0, 0] for job in jobs}  # trained, recorded: across attempts
    results: list[dict[str, Any]] = []

    def submit(job: GroupJob) -> Any:
        i = index[id(job)]
        return task.options(max_retries=0, runtime_env=quiet, **requests[i].options(), **placed[i]).remote(
            job, inputs, _seed(run_dir, job))

    def handle(job: GroupJob, item: dict[str, Any]) -> None:
        for record, data in item.get("variants", ()):
            store.receive_variant(run_dir, record, data)
            received[id(job)][record.get("source") != "trained"] += 1
        if item.get("variants"):
            progress(len(item["variants"]))
        for line in item.get("log", ()):
            log.write(**line)
        if "worker" in item:
            workers[id(job)] = item["worker"]
        if "summary" in item:  # counts of what arrived here, a dead attempt's included
            trained, recorded = received[id(job)]
            results.append({**item["summary"], "trained": trained, "recorded": recorded,
                            "skipped": len(job_variants(job, space)) - trained - recorded,
                            "worker": workers[id(job)], "request": asdict(requests[index[id(job)]])})

    try:
        cluster.stream(jobs, submit, handle, max_retries, "library")
    finally:
        cluster.remove_placement(groups)
    return results


def run_build(
    jobs: list[GroupJob], space: SearchSpace, run_dir: Path, use_ray: bool, max_retries: int,
    settings_sha256: str | None = None,
) -> list[dict[str, Any]]:
    """Run every job with one progress bar over all variants of the jobs' layers (a variant trained under
    other settings than `settings_sha256`, `BLDSettings.digest`, counts as missing). With `use_ray`, Ray
    must be connected (`cluster.connected`)."""
    layers = sorted({layer for job in jobs for layer in job.layers})
    keys = {store.key_of(v) for v in group_variants(space, layers)}
    missing = store.missing_variants(run_dir, group_variants(space, layers), settings_sha256=settings_sha256)
    done, missing_keys = len(keys) - len(missing), {store.key_of(v) for v in missing}
    # a job with nothing left is answered here: a finished build starts no Ray (15-28 s) and loads nothing
    left = [bool({store.key_of(v) for v in job_variants(job, space)} & missing_keys) for job in jobs]
    finished = [job for job, todo in zip(jobs, left) if not todo]
    jobs = [job for job, todo in zip(jobs, left) if todo]
    results = [{"layers": list(job.layers), "skipped": len(job_variants(job, space)), "trained": 0,
                "recorded": 0} for job in finished]
    t0 = time.perf_counter()
    with tqdm(total=len(keys), initial=done, desc="block library", unit="variant", dynamic_ncols=True) as bar:
        if jobs and use_ray:
            results += run_on_ray(jobs, space, run_dir, max_retries, bar.update)
        elif jobs:
            results += run_in_process(jobs, bar.update)
    store.library_log(run_dir).write(event="build_done", groups=len(jobs), wall_s=time.perf_counter() - t0)
    return sorted(results, key=lambda r: r["layers"])
