"""`puzzle importance` and `puzzle prune`: Minitron scores, then a width / depth pruned standard Llama."""

import math
import time
from pathlib import Path
from typing import Literal

import torch

from puzzle.data.blocks import check_token_ids, load_blocks
from puzzle.device import place, resolve
from puzzle.errors import PuzzleError
from puzzle.io import atomic_write_json, clean_stale_temps
from puzzle.model.checkpoint import load_config, load_model, load_tokenizer, to_puzzle
from puzzle.outputs import check_output
from puzzle.run_dir import RunDir, writes_run_dir
from puzzle.model.family import is_hybrid

from .importance import (
    ImportanceSettings,
    batched,
    calibration_sequences,
    check_importance_parent,
    compute_importance,
    has_importance,
    importance_dir,
    load_importance,
    load_importance_settings,
    save_importance,
    settings_json,
)
from .experts import ExpertCriterion
from .hybrid import HybridPlan, check_hybrid_flags, prune_hybrid
from .prune import PrunePlan, check_expert_flags, check_uniform, layers_to_drop, prune_model, save_pruned
from puzzle.shape import ModelShape

from .shape import target_sizes
from .task_depth import selection_items, task_layers_to_drop


@writes_run_dir("importance")
def importance(
    parent: Path,
    run_dir: Path | None = None,
    n_samples: int = 1024,
    seq_len: int | None = None,
    batch_size: int = 8,
    batch_agg: Literal["l2", "mean", "var"] = "l2",
    seq_agg: Literal["mean", "l2", "var"] = "mean",
    block_sizes: list[int] | None = None,
    drop_samples: int = 64,
    threads: int | None = None,
    force: bool = False,
    device: str = "auto",
    dtype: str = "auto",
) -> Path:
    """Minitron activation importance of heads, KV groups, neurons, channels and layers (forward passes only);
    an MoE parent's router statistics per expert (selection frequency, mean gate, output-aware score).

    Args:
        parent: the model to score (HF dir, safetensors or GGUF)
        run_dir: run directory with prepared data; scores go to RUN_DIR/importance/
        n_samples: calibration sequences (from the train split)
        seq_len: tokens per calibration sequence (default: the prepared block length)
        batch_size: sequences per forward pass
        batch_agg: aggregation over sequences (l2, mean or var)
        seq_agg: aggregation over the tokens of a sequence (mean, l2 or var)
        block_sizes: sizes k of the contiguous layer runs whose removal is scored (default: 1)
        drop_samples: calibration sequences used for the drop-layer losses (each needs extra forwards)
        threads: torch CPU threads
        force: recompute even when scores with the same settings exist
        device: where the forward passes run: auto (CUDA when a GPU is visible, else the CPU), cpu, cuda or cuda:N
        dtype: the model's dtype: auto (bf16 on CUDA, fp32 on the CPU), bf16, fp16 or fp32 (scores are summed in fp32)
    """
    if run_dir is None:
        raise PuzzleError("--run-dir is required")
    if n_samples < 1 or batch_size < 1 or drop_samples < 0:
        raise PuzzleError("n-samples and batch-size must be at least 1, drop-samples at least 0")
    RunDir(run_dir).check_parent(parent, corrected_only=True)  # after teacher correction: the corrected parent
    if threads:
        torch.set_num_threads(threads)
    runtime = resolve(device, dtype)
    settings = ImportanceSettings(batch_agg, seq_agg, tuple(block_sizes or [1]),
                                  drop_batches=math.ceil(drop_samples / batch_size))
    blocks = load_blocks(run_dir, "train")
    seq_len = seq_len or blocks.shape[1]
    from puzzle.model.fingerprint import fingerprint

    # the parent's content, not only its path: a parent overwritten in place is scored again
    wanted = settings_json(settings, parent=str(parent), parent_fingerprint=fingerprint(parent), n_samples=n_samples,
                           seq_len=seq_len, batch_size=batch_size, **runtime.settings())
    if has_importance(run_dir) and not force and load_importance_settings(run_dir) == wanted:
        print(f"importance: {importance_dir(run_dir)} is complete with these settings; nothing to do (--force recomputes)")
        return importance_dir(run_dir)
    model = place(to_puzzle(load_model(parent, dtype=runtime.dtype)), runtime.device)
    check_token_ids(blocks, model.config.vocab_size)
    seqs = calibration_sequences(blocks, n_samples, seq_len)
    start = time.perf_counter()
    scores = compute_importance(model, batched(seqs, batch_size), batch_agg=batch_agg, seq_agg=seq_agg,
                                block_sizes=settings.block_sizes, drop_batches=settings.drop_batches)
    path = save_importance(run_dir, scores, wanted)
    # timing is kept apart from the settings, which decide whether a rerun can reuse the scores
    atomic_write_json(path.parent / "timing.json", {"elapsed_s": time.perf_counter() - start})
    print(f"importance: {len(scores)} score tensors -> {path}")
    return path.parent


def _tokenizer_or_none(parent: Path):
    try:
        return load_tokenizer(parent)
    except PuzzleError:
        return None


@writes_run_dir("prune")
def prune(
    parent: Path,
    out: Path,
    run_dir: Path | None = None,
    hidden_size: int | None = None,
    ffn_size: int | None = None,
    heads_per_group: int | None = None,
    kv_groups: int | None = None,
    drop_layers: int = 0,
    depth_method: Literal["block", "bi", "loss", "task"] = "block",
    target_params: str | None = None,
    target_mode: Literal["width", "depth"] = "width",
    params_scope: Literal["total", "non-embedding"] = "total",
    rescale_norms: bool = True,
    device: str = "auto",
    dtype: str = "auto",
    force: bool = False,
    task_items: int = 100,
    task_file: Path | None = None,
    experts: int | None = None,
    top_k: int | None = None,
    expert_score: ExpertCriterion = "output",
    expert_size: int | None = None,
) -> Path:
    """Minitron width/depth pruning of a uniform parent into a plain checkpoint of its family; an MoE
    parent's experts pruned uniformly. A hybrid (NemotronH) parent loses whole layers (each a Mamba2,
    attention, MLP or MoE block), heads, MLP neurons, experts and expert width, not hidden channels
    (pruning/hybrid.py); it stays transformers' own NemotronH.

    Args:
        parent: the parent model (HF dir, safetensors or GGUF)
        out: output directory (a plain Llama checkpoint + tokenizer + pruning.json)
        run_dir: run directory holding importance/ (from `puzzle importance`)
        hidden_size: embedding channels to keep
        ffn_size: FFN neurons to keep per layer
        heads_per_group: query heads to keep in each kept KV group
        kv_groups: KV groups (KV heads) to keep per layer
        drop_layers: number of layers to remove
        depth_method: which layers: block (best contiguous run), bi (lowest Block Importance), loss
            (lowest loss when removed alone) or task (the contiguous run whose removal keeps the most
            multiple-choice accuracy on a held-out slice of the run's cloze task, as Minitron chose by Winogrande)
        target_params: a parameter count to reach, e.g. 80M or 1.2B; picks the shape (overrides the sizes)
        target_mode: width (hidden and FFN sizes, heads kept) or depth (layers) to reach the target
        params_scope: count total parameters or non-embedding ones for --target-params
        rescale_norms: rescale RMSNorm weights (and eps) for the smaller hidden size
        device: where the weights are sliced: auto (CUDA when a GPU is visible, else the CPU), cpu, cuda or cuda:N
        dtype: the pruned checkpoint's dtype: auto (bf16 on CUDA, fp32 on the CPU), bf16, fp16 or fp32
        force: replace an earlier output of another puzzle command at OUT (never anything else)
        task_items: --depth-method task: held-out cloze items each window is scored on (the tail of build-mc's
            order, disjoint from its evaluation task)
        task_file: --depth-method task: score on this JSONL multiple-choice task instead ({"context",
            "choices", "label"} per line; items of RUN/eval/cloze.jsonl are left out)
        experts: an MoE parent: experts to keep in every MoE layer (the highest-scoring, their router rows kept)
        top_k: an MoE parent: experts each token is routed to (default: the parent's, capped at --experts)
        expert_score: which router statistic ranks the experts: output (top-k weight x output norm),
            frequency (how often chosen) or gate (mean router probability)
        expert_size: a hybrid (NemotronH) parent: neurons kept in every routed expert (each expert its own best)
    """
    if run_dir is None:
        raise PuzzleError("--run-dir is required")
    hybrid = is_hybrid(load_config(parent))
    check_hybrid_flags(hidden_size, target_params, expert_size, hybrid)  # before the importance and the weights
    RunDir(run_dir).check_parent(parent, corrected_only=True)  # after teacher correction: the corrected parent
    if not hybrid:  # an MoE parent's flags checked before the importance it would look for and the weights
        check_expert_flags(ModelShape.from_config(load_config(parent)), hidden_size, ffn_size, target_params, experts,
                           top_k)
    check_output(Path(out), "prune", force=force, inputs=(parent,), run_dir=run_dir)
    clean_stale_temps(RunDir(run_dir).baselines)  # what a killed prune left there: the prune lock is ours
    runtime = resolve(device, dtype)
    check_importance_parent(run_dir, parent)
    scores = load_importance(run_dir)
    tokenizer = _tokenizer_or_none(parent)
    task = None
    if depth_method == "task" and (drop_layers or (target_params and target_mode == "depth")):
        if tokenizer is None:
            raise PuzzleError("--depth-method task scores multiple-choice text, but the parent has no tokenizer")
        task = selection_items(run_dir, task_items, task_file)  # refused before the weights are read
    model = place(to_puzzle(load_model(parent, dtype=runtime.dtype)), runtime.device)
    if not hybrid:
        check_uniform(model)
        shape = ModelShape.from_config(model.config)
        hidden_size, ffn_size, drop_layers = target_sizes(shape, target_params, target_mode, params_scope,
                                                          hidden_size, ffn_size, drop_layers)
    if drop_layers < 0:
        raise PuzzleError(f"drop-layers must be >= 0, got {drop_layers}")
    task_record = None
    if task and drop_layers:  # scored here, with the parent loaded: the window is k = drop_layers
        drop, task_record = task_layers_to_drop(model, tokenizer, *task, drop_layers)
    else:
        drop = layers_to_drop(scores, drop_layers, depth_method)
    if hybrid:
        pruned, record = prune_hybrid(model, scores, HybridPlan(
            drop_layers=tuple(drop), ffn_size=ffn_size, heads_per_group=heads_per_group, kv_groups=kv_groups,
            experts=experts, top_k=top_k, expert_size=expert_size, expert_criterion=expert_score))
    else:
        plan = PrunePlan(hidden_size=hidden_size, intermediate_size=ffn_size, heads_per_group=heads_per_group,
                         kv_groups=kv_groups, drop_layers=tuple(drop), rescale_norms=rescale_norms,
                         experts=experts, top_k=top_k, expert_criterion=expert_score)
        pruned, record = prune_model(model, scores, plan)
    record.update(parent=str(parent), depth_method=depth_method if drop else None, target_params=target_params,
                  params_scope=params_scope, **({"task_depth": task_record} if task_record else {}))
    save_pruned(pruned, out, tokenizer, record)
    p, q = record["params"], record["parent_params"]
    print(f"prune: {q['total']:,} -> {p['total']:,} parameters ({p['non_embedding']:,} non-embedding, "
          f"{p['non_embedding'] / q['non_embedding']:.1%} of the parent's); dropped layers {record['dropped_layers']} "
          f"-> {out}")
    return Path(out)
