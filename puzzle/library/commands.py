"""`puzzle build-library`: every child block of the search space, initialised from the parent and trained by BLD."""

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

from puzzle import cluster
from puzzle.data.blocks import check_token_ids, load_blocks, load_meta
from puzzle.device import resolve, resolve_remote
from puzzle.errors import PuzzleError
from puzzle.io import clean_stale_temps, read_yaml
from puzzle.library import store
from puzzle.library.bld import BLDSettings, FFNInit
from puzzle.library.cost import group_variants, plan_jobs
from puzzle.library.ray_jobs import GroupJob, run_build
from puzzle.model.checkpoint import load_config
from puzzle.pruning.importance import check_importance_parent
from puzzle.run_dir import RunDir, writes_run_dir
from puzzle.search_space import build_search_space, resolve_space_path, run_parent
from puzzle.stages import settings_of
from puzzle.units import GIB


def _check_manifest(run_dir: Path, parent: Path, space_name: str, settings: BLDSettings, digest: str, force: bool) -> None:
    manifest = store.read_manifest(run_dir)
    drop = []
    fingerprint = RunDir(run_dir).info().get("parent_fingerprint")
    if force or store.of_another_parent(manifest, fingerprint):
        # a parent overwritten in place: every record (trained variants, and the parent's own and no-op
        # entries with their measured losses) is of the old bytes; until rebuilt, they are missing
        drop = list(manifest["variants"])
    elif manifest["variants"] and manifest.get("parent") not in (None, str(parent)):
        raise PuzzleError(
            f"the block library in {store.library_dir(run_dir)} was built from {manifest['parent']}, not {parent}; "
            "use another --run-dir or pass --force to rebuild it"
        )
    header = {"parent": str(parent), "parent_fingerprint": fingerprint, "search_space": space_name,
              "settings": settings.to_dict()}
    store.update_manifest(run_dir, _stamp_legacy(manifest, settings, digest), header=header, drop=drop)


def _stamp_legacy(manifest: dict[str, Any], settings: BLDSettings, digest: str) -> list[dict[str, Any]]:
    """Trained entries of a library written before entries carried their settings' digest: the header's
    settings were theirs, so when those equal today's they are stamped with today's digest (not retrained)."""
    if manifest.get("settings") != settings.to_dict():
        return []
    return [{**r, "settings_sha256": digest} for r in manifest["variants"].values()
            if r.get("source") == "trained" and "settings_sha256" not in r]


@writes_run_dir("build_library")
def build_library(
    run_dir: Path = Path("runs/default"),
    parent: Path | None = None,
    search_space: str | None = None,
    tokens_per_block: int = BLDSettings.tokens_per_block,
    batch_size: int = BLDSettings.batch_size,
    seq_len: int | None = BLDSettings.seq_len,
    lr: float = BLDSettings.lr,
    weight_decay: float = BLDSettings.weight_decay,
    calibration_tokens: int = BLDSettings.calibration_tokens,
    eval_tokens: int = BLDSettings.eval_tokens,
    ffn_init: FFNInit = BLDSettings.ffn_init,
    layers: list[int] | None = None,
    workers: int | Literal["auto"] = "auto",
    worker_memory_gib: float | None = None,
    threads: int = 1,
    ray: bool = True,
    address: str | None = None,
    max_retries: int = 3,
    seed: int = BLDSettings.seed,
    force: bool = False,
    device: str = "auto",
    dtype: str = "auto",
) -> dict[str, Any]:
    """block library: pruned initialisation + blockwise local distillation (BLD) of every variant, on Ray

    Args:
        run_dir: run directory; reads data/ (puzzle prepare-data), writes library/
        parent: parent model (HF dir, .safetensors or .gguf); default: the one in RUN_DIR/parent.json
        search_space: shipped space name or YAML path; default: RUN_DIR/parent.json's, else llama_default
        tokens_per_block: training tokens each variant sees
        batch_size: blocks per training step
        seq_len: crop the prepared blocks to this many tokens (default: as prepared)
        lr: AdamW peak learning rate (cosine decay with warm-up)
        weight_decay: AdamW weight decay of the weight matrices
        calibration_tokens: tokens for Channel Contribution and the linear FFN's least squares
        eval_tokens: held-out tokens on which the loss at init and at the end is measured
        ffn_init: neuron ranking for pruned FFNs; auto: Minitron importance when RUN_DIR/importance has it,
            else Channel Contribution
        layers: only these layers (default: all)
        workers: layer groups, one Ray task each; auto: one per GPU of the Ray cluster (per THREADS CPUs on a
            CPU-only one) when a cluster is named (--address, RAY_ADDRESS), else 1; 1 (without a cluster),
            0 or --no-ray: all in this process
        worker_memory_gib: host memory one job may take (estimated as `puzzle plan` does): a layer group
            over it is split into jobs of fewer variants, with the same results (default: no limit)
        threads: CPU threads (and Ray CPUs) per worker
        ray: run the groups as Ray tasks; --no-ray runs them one after another in this process
        address: Ray cluster address; default: RAY_ADDRESS, else a local embedded Ray
        max_retries: times a group whose worker died is submitted again
        seed: data order and held-out sample
        force: retrain every variant even if the library already holds it (a variant trained under other
            settings is retrained without it; workers, threads, ray, address and max_retries change no weight)
        device: where the parent's forward and the training run: auto (CUDA when a GPU is visible, else the
            CPU), cpu, cuda or cuda:N
        dtype: the parent's dtype and the training's autocast dtype (fp32 weights and AdamW state): auto (bf16
            on CUDA, fp32 on the CPU), bf16, fp16 or fp32
    """
    run_dir = Path(run_dir).resolve()
    parent_path, space_name = run_parent(run_dir, parent, search_space)  # absolute: Ray workers may start elsewhere
    workers = cluster.parse_workers(workers)
    # the dtype is fixed here, not in the workers: one meaning of `auto` for the whole library. On Ray the
    # device is each worker's (the GPU Ray assigned), so only the names are checked on this driver.
    on_ray = cluster.uses_ray(workers, ray, address)
    runtime = resolve_remote(device, dtype) if on_ray else resolve(device, dtype)
    # the arguments as given (no local reuses a setting's name before this line); device and dtype as resolved
    settings = settings_of(BLDSettings, locals(), device="auto" if on_ray and device == "auto" else str(runtime.device),
                           dtype=runtime.dtype_name)
    if threads < 0 or max_retries < 0:
        raise PuzzleError("threads and max-retries must not be negative")
    meta = load_meta(run_dir)  # fail now, not inside a worker, when the data is not prepared
    digest = settings.digest(run_dir)
    space_path = resolve_space_path(space_name)
    space_raw = read_yaml(space_path)
    parent_config = load_config(parent_path)
    for split in ("train", "val"):  # ... or holds a token id outside the parent's vocabulary
        if int(meta.get(f"n_{split}_blocks", 0)) > 0:
            check_token_ids(load_blocks(run_dir, split), parent_config.vocab_size)
    space = build_search_space(space_raw, parent_config, space_path.stem)
    chosen = sorted(set(layers)) if layers else list(range(space.num_layers))
    bad = [i for i in chosen if not 0 <= i < space.num_layers]  # a comparison, not a search of a list per layer
    if bad:
        raise PuzzleError(f"layers {bad} are outside the parent's {space.num_layers} layers")
    if ffn_init != "channel_contribution":  # FFNs may start from the importance scores: of this parent only
        check_importance_parent(run_dir, parent_path)
    _check_manifest(run_dir, parent_path, space.name, settings, digest, force)
    clean_stale_temps(store.library_dir(run_dir), recursive=True)  # what a killed build's writes left

    if worker_memory_gib is not None and worker_memory_gib <= 0:
        raise PuzzleError(f"worker-memory-gib must be positive, got {worker_memory_gib}")
    seq_len = settings.seq_len or int(meta["seq_len"])
    budget = worker_memory_gib * GIB if worker_memory_gib is not None else None
    use_ray = cluster.uses_ray(workers, ray, address)
    todo = store.missing_variants(run_dir, group_variants(space, chosen), settings_sha256=digest)
    t0 = time.perf_counter()
    with cluster.connected(address) if use_ray and todo else nullcontext():  # a finished build starts no Ray
        if workers == "auto":
            workers = cluster.auto_workers(threads) if use_ray and todo else 1
        jobs = [
            GroupJob(str(run_dir), str(parent_path), space_raw, space_path.stem, plan.layers, settings.to_dict(), threads,
                     plan.keys)
            for plan in plan_jobs(space, parent_config, settings, chosen, workers or 1, seq_len, budget)
        ]
        results = run_build(jobs, space, run_dir, use_ray, max_retries, digest)
    missing = store.missing_variants(run_dir, group_variants(space, chosen), settings_sha256=digest)
    if missing:
        names = ", ".join(store.key_of(v) for v in missing[:5])
        raise PuzzleError(f"{len(missing)} variants are still missing ({names}, ...); rerun puzzle build-library")
    n = len(group_variants(space, chosen))
    summary = {
        "variants": n,
        "trained": sum(r.get("trained", 0) for r in results),
        "recorded": sum(r.get("recorded", 0) for r in results),  # the parent's own variants and no-ops
        "skipped": sum(r.get("skipped", 0) for r in results),
        "wall_s": time.perf_counter() - t0,
        "groups": results,
    }
    print(f"block library: {n} variants in {store.library_dir(run_dir)} "
          f"({summary['trained']} trained now, {summary['recorded']} recorded without training, "
          f"{summary['skipped']} already there)")
    return summary
