"""`puzzle evaluate`: one model's quality (against its parent) and speed, as JSON in run_dir/eval/."""

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from puzzle.data.blocks import check_token_ids, iterate_batches, load_blocks
from puzzle.device import place, resolve
from puzzle.errors import PuzzleError
from puzzle.io import atomic_write_json
from puzzle.model.checkpoint import load_model, load_tokenizer, puzzle_config_from
from puzzle.profiling.commands import table_model_costs
from puzzle.profiling.costs import load_costs
from puzzle.profiling.hardware import load_profile
from puzzle.profiling.roofline import predict_model_costs
from puzzle.run_dir import RunDir, safe_name, writes_run_dir
from puzzle.shape import ModelShape

from .lm_eval_adapter import run_lm_eval  # lm_eval itself is imported when called

from .mc import evaluate_mc, load_mc_tasks
from .quality import quality_metrics
from .router import router_load
from .throughput import measure_throughput


SHAPE_KEYS = ("hidden_size", "num_attention_heads", "head_dim", "vocab_size", "num_hidden_layers")


def _same_shape(model_config: Any, profiled: dict[str, Any]) -> bool:
    """Whether a model has the widths and depth of the parent a costs table was profiled for."""
    shape = asdict(ModelShape.from_config(model_config))
    return all(profiled.get(k) == shape[k] for k in SHAPE_KEYS)


def predicted_costs(run_dir: Path, model_config: Any, budget: str) -> dict[str, Any]:
    """Whole-model figures of a model on a hardware profile, and its predicted speedup over the parent.

    From the costs table `puzzle profile` wrote for the run (measured or roofline): the numbers `solve`
    predicted with, so a child's evaluation and its solution state one speedup. A model the table cannot
    express (a pruned baseline of another width or depth, or a variant it lacks) gets the roofline's
    figures, its speedup relative to the parent's roofline (`parent_roofline` in the costs JSON); without
    costs for the profile, the roofline's figures and no speedup.
    """
    config = puzzle_config_from(model_config)
    try:
        table, meta = load_costs(run_dir, budget)
    except PuzzleError:
        table, meta = None, {}
    if table is not None and _same_shape(config, meta.get("model", {})):
        try:
            figures = table_model_costs(table, meta, config.blocks)
            speedup = figures["throughput_tokens_s"] / meta["parent"]["throughput_tokens_s"]
            return {"source": meta.get("source"), **figures, "speedup": speedup}
        except PuzzleError:  # a variant the table lacks
            pass
    figures = predict_model_costs(config, config.blocks, load_profile(budget))
    reference = meta.get("parent_roofline", {}).get("throughput_tokens_s")
    speedup = figures["throughput_tokens_s"] / reference if reference else None
    return {"source": "roofline", **figures, "speedup": speedup}


@writes_run_dir("evaluate")
def evaluate(model: Path, parent: Path | None = None, run_dir: Path = Path("runs/default"), val_blocks: int = 32,
             batch_size: int = 4, mc_tasks: list[str] | None = None, budget: str | None = "h100_80gb",
             measure: bool = True, name: str | None = None, lm_eval_tasks: list[str] | None = None,
             device: str = "auto", dtype: str = "auto") -> dict[str, Any]:
    """Validation perplexity, KL and top-1 agreement with the parent, multiple choice, throughput, and each MoE
    layer's router load (the share of its routing each expert receives, evaluate/router.py).

    Args:
        model: the model to evaluate (a puzzle child, a pruned Llama, or any supported checkpoint)
        parent: the parent to compare with (default: the one recorded in the run directory, the corrected
            one after teacher correction; none if absent)
        run_dir: the run directory: validation blocks come from run_dir/data, results go to run_dir/eval/NAME.json
        val_blocks: number of validation blocks to evaluate on
        batch_size: validation batch size
        mc_tasks: JSONL multiple-choice task files ({"context", "choices", "label"} per line)
        budget: hardware profile for the predicted throughput and speedup, from the run's costs table for it
            (see `predicted_costs`; none to skip)
        measure: measure prefill and decode tokens/s on this machine
        name: result name (default: the model directory's name)
        lm_eval_tasks: lm-evaluation-harness task names, local task YAMLs, or MC JSONL files (scored by
            lm-eval's own code); needs lm_eval installed (pip install 'puzzle[lm-eval]'); hub access stays off
        device: where to evaluate: auto (CUDA when a GPU is visible, else the CPU), cpu, cuda or cuda:N
        dtype: the models' dtype: auto (bf16 on CUDA, fp32 on the CPU), bf16, fp16 or fp32 (metrics in fp32)
    """
    run_dir = Path(run_dir)
    runtime = resolve(device, dtype)
    name = safe_name(name or Path(model).resolve().name, "evaluation name")  # files eval/NAME.json: checked first
    if parent is None and (recorded := RunDir(run_dir).info().get("parent")):
        parent = Path(recorded)  # after teacher correction: the corrected parent
    elif parent is not None:
        RunDir(run_dir).check_parent(parent, corrected_only=True)
    mc_items = {Path(p).stem: load_mc_tasks(p) for p in (mc_tasks or [])}  # fail fast on bad task files
    blocks = load_blocks(run_dir, "val")[:val_blocks]
    subject = place(load_model(model, dtype=runtime.dtype), runtime.device)
    check_token_ids(blocks, subject.config.vocab_size)
    if parent is None:
        reference = None
    elif Path(parent).resolve() == Path(model).resolve():
        reference = subject  # the parent against itself: KL 0 and agreement 1, from one forward
    else:
        reference = place(load_model(parent, dtype=runtime.dtype), runtime.device)
    if reference is not None and reference.config.vocab_size != subject.config.vocab_size:
        raise PuzzleError(f"{model} and its parent {parent} have different vocabularies")
    started = time.perf_counter()
    from puzzle.model.fingerprint import fingerprint

    # the contents compared, not only their paths (a parent overwritten in place is another reference)
    result: dict[str, Any] = {"model": str(model), "parent": str(parent) if parent else None, "name": name,
                              "model_fingerprint": fingerprint(model),
                              "parent_fingerprint": fingerprint(parent) if parent else None,
                              "device": str(runtime.device), "dtype": runtime.dtype_name}
    result["params"] = sum(p.numel() for p in subject.parameters())
    with router_load(subject) as routing:  # each MoE layer's load per expert, from the same forwards
        result["validation"] = quality_metrics(subject, iterate_batches(blocks, batch_size, shuffle=False, seed=0), reference)
    result.update(routing)
    if mc_items:
        tokenizer = load_tokenizer(model)
        result["multiple_choice"] = {task: evaluate_mc(subject, tokenizer, items) for task, items in mc_items.items()}
    if lm_eval_tasks:
        result["lm_eval"] = run_lm_eval(subject, load_tokenizer(model), lm_eval_tasks)
    if measure:
        result["measured"] = measure_throughput(subject, subject.config.vocab_size)
    if budget and budget.lower() != "none":
        result["predicted"] = {"budget": budget, **predicted_costs(run_dir, subject.config, budget)}
    result["wall_s"] = time.perf_counter() - started
    out = atomic_write_json(RunDir(run_dir).eval_result(name), result)
    v = result["validation"]
    line = f"{name}: ppl {v['perplexity']:.3f}"
    if "kl" in v:
        line += f", KL {v['kl']:.4f}, top-1 agreement {v['top1_agreement']:.3f}"
    print(line + f"  -> {out}")
    return result
