"""`puzzle score`: replace-1-block quality of every variant of the search space, from the block library.

Writes `run_dir/scores/scores.parquet` + `.csv` (one row per layer, kind, variant: kl, lm_loss,
top1_agreement, cosine, tokens) and `scores.json` (the same rows, the settings and the parent's own
metrics).

Resuming: every (variant, batch) result is appended to `scores/partial.jsonl` as it finishes, keyed by the
variant, the batch index, a fingerprint of the settings (parent path and content, prepared data, number of blocks, batch
size, seed) and the library entry (its file's sha256, or "parent" / "noop"). A rerun computes only what
is missing or stale, and loads no model at all when nothing is; the tables are written at the end.

On Ray (`--workers N`, or `auto` with a cluster named): the variants are split by layer ranges, one
task per range (puzzle/scoring/ray_jobs.py); their results arrive here and go into the same log.

Memory: the loop is batch-outer, variant-inner, so only one batch's parent reference is held (see
`puzzle.scoring.replace1`: B*T*V*4 bytes of parent log-probabilities plus chunk temporaries). The parent is
loaded once (`load_puzzle`: built on the meta device, filled from safetensors); each library file is read
and verified once per run (`store.LibraryReader`, keeping up to `KEEP_LIBRARY` x the parent's bytes of them).
"""

import hashlib
import json
import logging
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator, Literal

import pandas as pd
import torch
from tqdm.auto import tqdm

from puzzle import cluster
from puzzle.data.blocks import check_token_ids, iterate_batches, load_blocks, load_meta
from puzzle.device import Runtime, place, resolve, resolve_remote
from puzzle.errors import PuzzleError
from puzzle.io import JsonlLog, atomic_write_json, clean_stale_temps, read_yaml, write_table
from puzzle.library.store import check_library_parent, key_of, library_dir, missing_variants, read_manifest
from puzzle.model.checkpoint import load_config, load_puzzle
from puzzle.run_dir import DEFAULT_SPACE, RunDir, writes_run_dir
from puzzle.scoring.ray_jobs import ScoreJob, layer_ranges, score_on_ray, without
from puzzle.scoring.replace1 import PARENT_KEY, Sums, score_results
from puzzle.search_space import Variant, build_search_space, resolve_run_info, resolve_space_path

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
COLUMNS = ["layer", "kind", "variant", "kl", "lm_loss", "top1_agreement", "cosine", "tokens"]


def scores_dir(run_dir: str | Path) -> Path:
    return RunDir(run_dir).scores


def _fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def library_entry(manifest: dict[str, Any], variant: Variant) -> str:
    """What identifies the weights a variant is scored with: its file's hash, or "parent" / "noop"."""
    if variant.is_parent:
        return "parent"
    if variant.config.no_op:
        return "noop"
    record = manifest["variants"].get(key_of(variant), {})
    return record.get("sha256") or record.get("source") or "missing"


def _check_library(run_dir: Path, variants: list[Variant], space_name: str) -> None:
    trained = [v for v in variants if not v.is_parent and not v.config.no_op]  # the others need no file
    missing = missing_variants(run_dir, trained, check_hash=False)
    if missing:
        raise PuzzleError(
            f"the block library in {library_dir(run_dir)} lacks {len(missing)} of the {len(trained)} trained variants "
            f"of search space {space_name!r} (first: {key_of(missing[0])}); run puzzle build-library"
        )


class ResultLog:
    """The (variant, batch) results of this fingerprint in `partial.jsonl`, appended to as they finish."""

    def __init__(self, path: Path, fingerprint: str, entries: dict[str, str]) -> None:
        self.log = JsonlLog(path)
        self.fingerprint = fingerprint
        self.entries = entries  # key -> library entry the results must have been computed with
        self.sums: dict[tuple[str, int], Sums] = {}
        for record in self.log.read():  # later records win; other fingerprints and stale entries are ignored
            try:
                if record["fingerprint"] == fingerprint and record["entry"] == entries.get(record["key"]):
                    self.sums[(record["key"], int(record["batch"]))] = Sums.from_dict(record)
            except (KeyError, TypeError, ValueError):
                continue  # a record of another format: recompute it

    def has(self, key: str, batch: int) -> bool:
        return (key, batch) in self.sums

    def add(self, key: str, batch: int, sums: Sums, **extra: Any) -> None:
        self.log.write(key=key, **extra, batch=batch, fingerprint=self.fingerprint, entry=self.entries[key], **sums.to_dict())
        self.sums[(key, batch)] = sums

    def total(self, key: str, n_batches: int) -> Sums:
        return sum((self.sums[(key, b)] for b in range(n_batches)), Sums())


@writes_run_dir("score")
def score(
    run_dir: Path = Path("runs/default"),
    parent: Path | None = None,
    search_space: str | None = None,
    blocks: int = 16,
    batch_size: int = 8,
    seed: int = 0,
    chunk_tokens: int = 512,
    device: str = "auto",
    dtype: str = "auto",
    workers: int | Literal["auto"] = "auto",
    threads: int = 1,
    ray: bool = True,
    address: str | None = None,
    max_retries: int = 3,
) -> Path:
    """Replace-1-block quality of every library variant: KL to the parent, LM loss, top-1 agreement, cosine.

    Args:
        run_dir: the run directory (holds the prepared data and the block library; scores go to RUN_DIR/scores)
        parent: the parent model (HF dir, .safetensors or .gguf); default: the one recorded in RUN_DIR/parent.json
        search_space: shipped space name or YAML path; default: the recorded one, else the library's, else llama_default
        blocks: validation blocks to score on (a seeded sample of RUN_DIR/data/val.bin)
        batch_size: blocks per forward pass; the parent's log-probabilities of one batch are held in memory
            (batch_size x seq_len x vocab x 4 bytes)
        seed: seed of the validation sample
        chunk_tokens: tokens per chunk of the vocabulary-sized logits (bounds memory; results change only by float rounding)
        device: where to score: auto (CUDA when a GPU is visible, else the CPU), cpu, cuda or cuda:N. On Ray,
            any device but cpu requests GPUs and runs on the one Ray assigns to each worker
        dtype: the parent's and the variants' dtype: auto (bf16 on CUDA, fp32 on the CPU), bf16, fp16 or fp32
            (log-probabilities, KL and losses are computed in fp32 either way)
        workers: Ray tasks, one per contiguous layer range; auto: one per GPU of the Ray cluster (per THREADS
            CPUs on a CPU-only one) when a cluster is named (--address, RAY_ADDRESS), else 1; 1 (without a
            cluster), 0 or --no-ray: in this process
        threads: CPU threads (and Ray CPUs) per Ray worker
        ray: score on Ray when there are several workers or a cluster is named; --no-ray: in this process
        address: Ray cluster address; default: RAY_ADDRESS, else a local embedded Ray
        max_retries: times a layer range whose worker died is submitted again
    """
    run_dir = Path(run_dir)
    workers = cluster.parse_workers(workers)
    # here, or on each Ray worker's node (whose GPU this driver may not have): one line before anything slow
    runtime = resolve_remote(device, dtype) if cluster.uses_ray(workers, ray, address) else resolve(device, dtype)
    for name, value in (("blocks", blocks), ("batch_size", batch_size), ("chunk_tokens", chunk_tokens)):
        if value < 1:
            raise PuzzleError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    val = load_blocks(run_dir, "val")  # no data: one clear line before anything slow
    meta = load_meta(run_dir)
    info = resolve_run_info(run_dir, parent, search_space)
    manifest = read_manifest(run_dir)
    space_name = info.get("search_space") or manifest.get("search_space") or DEFAULT_SPACE
    parent_config = load_config(info["parent"])
    check_token_ids(val, parent_config.vocab_size)
    space_path = resolve_space_path(space_name)
    space_raw = read_yaml(space_path)
    space = build_search_space(space_raw, parent_config, space_path.stem)
    variants = list(space.variants())
    _check_library(run_dir, variants, space.name)
    check_library_parent(run_dir, manifest, info.get("parent_fingerprint"))  # of other parent weights: rebuild first

    n_blocks = min(blocks, len(val))
    n_batches = math.ceil(n_blocks / batch_size)
    settings = {
        "format": FORMAT_VERSION,
        "parent": str(info["parent"]),
        "parent_fingerprint": info.get("parent_fingerprint"),  # its content: a parent overwritten in place rescores
        "data": meta.get("fingerprint"),
        "seq_len": int(meta["seq_len"]),
        "blocks": n_blocks,
        "batch_size": batch_size,
        "seed": seed,
        **runtime.settings(),  # nothing under fp32: tables scored before --dtype stay valid
    }
    fingerprint = _fingerprint(settings)
    out_dir = scores_dir(run_dir)
    clean_stale_temps(out_dir)
    entries = {key_of(v): library_entry(manifest, v) for v in variants} | {PARENT_KEY: "parent"}
    results = ResultLog(out_dir / "partial.jsonl", fingerprint, entries)
    todo = {b: [v for v in variants if not results.has(key_of(v), b)] for b in range(n_batches)}
    needed = {b for b in range(n_batches) if todo[b] or not results.has(PARENT_KEY, b)}
    use_ray = cluster.uses_ray(workers, ray, address) and bool(needed)  # a finished table starts no Ray
    if needed:
        with cluster.connected(address) if use_ray else nullcontext():
            count = (cluster.auto_workers(threads) if use_ray else 1) if workers == "auto" else workers
            if use_ray:
                ray_jobs = [ScoreJob(str(info["parent"]), space_raw, space_path.stem, tuple(layers),
                                     {b: tuple(key_of(v) for v in todo[b] if v.layer in layers) for b in todo},
                                     tuple(sorted(needed)) if i == 0 else (), n_blocks, batch_size, seed,  # 1st: parent rows
                                     chunk_tokens, device, threads, runtime.dtype_name)
                            for i, layers in enumerate(layer_ranges(variants, space.num_layers, max(count, 1)))]
                _score_on_ray(run_dir, ray_jobs, variants, int(meta["seq_len"]), results, max_retries)
            else:
                batches = iterate_batches(val, batch_size, shuffle=True, seed=seed, limit=n_blocks)
                _score_batches(run_dir, info["parent"], runtime, chunk_tokens, batches, todo, needed, results)
    else:
        log.info(json.dumps({"event": "score_cached", "run_dir": str(run_dir), "variants": len(variants)}))

    rows = [{"layer": v.layer, "kind": v.kind, "variant": v.name, **results.total(key_of(v), n_batches).means()}
            for v in variants]
    parent_metrics = results.total(PARENT_KEY, n_batches).means()
    table = write_table(pd.DataFrame(rows, columns=COLUMNS), RunDir(run_dir).scores_table,
                        rebuild=f"puzzle score --run-dir {run_dir}")
    atomic_write_json(out_dir / "scores.json", {
        "parent": str(info["parent"]),
        "search_space": space.name,
        "settings": {**settings, "chunk_tokens": chunk_tokens, "device": str(runtime.device), "dtype": runtime.dtype_name},
        "fingerprint": fingerprint,
        "parent_lm_loss": parent_metrics["lm_loss"],
        "parent_metrics": parent_metrics,
        "rows": rows,
    })
    log.info(json.dumps({"event": "score_done", "table": str(table), "variants": len(rows), "tokens": parent_metrics["tokens"]}))
    print(f"wrote {table} ({len(rows)} variants, {parent_metrics['tokens']} tokens; "
          f"parent LM loss {parent_metrics['lm_loss']:.4f})")
    return table


def _score_on_ray(run_dir: Path, jobs: list[ScoreJob], variants: list[Variant], seq_len: int, results: ResultLog,
                  max_retries: int) -> None:
    """The layer ranges as Ray tasks, each result logged as it arrives (see puzzle/scoring/ray_jobs.py)."""
    bar = tqdm(total=sum(len(k) for job in jobs for k in job.todo.values()), desc="score", unit="variant-batch")

    def add(key: str, batch: int, sums: Sums, extra: dict[str, Any]) -> None:
        if results.has(key, batch):  # the parent's row, or a result a dead worker's job sent before dying
            return
        results.add(key, batch, sums, **extra)
        if key != PARENT_KEY:
            bar.update()

    try:
        workers = score_on_ray(run_dir, jobs, {key_of(v): v for v in variants}, seq_len, add,
                               lambda job: without(job, results.has), max_retries)
    finally:
        bar.close()
    for worker in workers:  # where each range ran: host, pid, device, the GPU ids Ray assigned, the request
        JsonlLog(scores_dir(run_dir) / "log.jsonl").write(event="score_worker", **worker)


def _score_batches(
    run_dir: Path,
    parent_path: str,
    runtime: Runtime,
    chunk_tokens: int,
    batches: Iterator[torch.Tensor],
    todo: dict[int, list[Variant]],
    needed: set[int],
    results: ResultLog,
) -> None:
    """Load the parent and compute the `todo` variants of each `needed` batch, logging each result as it finishes."""
    model = place(load_puzzle(parent_path, dtype=runtime.dtype), runtime.device).eval()
    parent_batches = {b for b in needed if not results.has(PARENT_KEY, b)}
    bar = tqdm(total=sum(len(t) for t in todo.values()), desc="score", unit="variant-batch")
    try:
        for key, b, sums, variant in score_results(run_dir, model, batches, todo, parent_batches, chunk_tokens):
            if variant is None:
                results.add(PARENT_KEY, b, sums)
                continue
            results.add(key, b, sums, layer=variant.layer, kind=variant.kind, variant=variant.name)
            bar.update()
            bar.set_postfix(batch=b, layer=variant.layer, refresh=False)
    finally:
        bar.close()
