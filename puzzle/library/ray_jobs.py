"""Running a library build: layer groups as Ray tasks (or one after another in this process).

Each task owns a contiguous group of layers. It loads the parent itself (from its path), receives the
prepared data and importance scores through Ray's object store (`bld_task`, puzzle/cluster.py: workers
never open the run directory), runs the parent once per batch up to its last layer, trains every variant
of its layers and streams each one back as it finishes; the driver writes it (`store.receive_variant`) and
advances one progress bar over all variants. A job whose worker dies is submitted again without the
variants the driver already holds.
"""

import json
import math
import threading
import time
from dataclasses import asdict, dataclass, replace
from itertools import accumulate
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from puzzle import cluster
from puzzle.errors import PuzzleError
from puzzle.library import store
from puzzle.library.bld import BLDSettings, build_layer_group, group_variants, weight_train_flops
from puzzle.run_dir import RunDir
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


def bld_task(job: GroupJob, inputs: dict[str, bytes], seed: dict[str, bytes]) -> Iterator[dict[str, Any]]:
    """A Ray generator task: `run_group` on a private run directory holding the shipped `inputs` (prepared
    data, importance) and `seed` (the driver's manifest and the group's finished files, so a resubmitted
    job skips them). Yields {"worker": `task_device()`} first, then {"log": [...], "variants": [(record,
    bytes or None)]} as variants finish, then {"summary": ...} (see puzzle/cluster.py, Transport)."""
    worker = cluster.task_device()
    yield {"worker": worker}
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
    """Each job's Ray request from `build_library_cost` on its layers alone (one worker's peak)."""
    from puzzle.data.blocks import load_meta
    from puzzle.model.checkpoint import load_config
    from puzzle.plan import job_estimate

    requests = []
    for job in jobs:
        config = load_config(job.parent)
        seq_len = int(load_meta(job.run_dir)["seq_len"])
        est = job_estimate("build_library", config, space, seq_len, {**job.settings, "layers": list(job.layers), "workers": 1})
        requests.append(cluster.job_resources(est.host_bytes, est.gpu_bytes or est.host_bytes, job.threads, info))
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
    inputs = cluster.ship(run_dir, cluster.run_files(run_dir, run.data) + cluster.run_files(run_dir, run.importance))
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
                            "skipped": len(group_variants(space, job.layers)) - trained - recorded,
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
    done, missing_layers = len(keys) - len(missing), {v.layer for v in missing}
    # a group with nothing left is answered here: a finished build starts no Ray (15-28 s) and loads nothing
    finished = [job for job in jobs if not missing_layers & set(job.layers)]
    jobs = [job for job in jobs if missing_layers & set(job.layers)]
    results = [{"layers": list(job.layers), "skipped": len(group_variants(space, job.layers)), "trained": 0,
                "recorded": 0} for job in finished]
    t0 = time.perf_counter()
    with tqdm(total=len(keys), initial=done, desc="block library", unit="variant", dynamic_ncols=True) as bar:
        if jobs and use_ray:
            results += run_on_ray(jobs, space, run_dir, max_retries, bar.update)
        elif jobs:
            results += run_in_process(jobs, bar.update)
    store.library_log(run_dir).write(event="build_done", groups=len(jobs), wall_s=time.perf_counter() - t0)
    return sorted(results, key=lambda r: r["layers"])
