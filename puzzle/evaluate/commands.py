"""`puzzle evaluate`: one model's quality (against its parent) and speed, as JSON in run_dir/eval/."""

import time
from pathlib import Path
from typing import Any

from puzzle.errors import PuzzleError
from puzzle.io import atomic_write_json
from puzzle.model.checkpoint import load_model, load_tokenizer, puzzle_config_from
from puzzle.run_dir import read_run_info

from .mc import evaluate_mc, load_mc_tasks
from .quality import quality_metrics
from .throughput import measure_throughput


def predicted_costs(model_config: Any, budget: str) -> dict[str, Any]:
    """Roofline prediction of the whole model on a hardware profile, from its block choices alone."""
    from puzzle.profiling.hardware import load_profile
    from puzzle.profiling.roofline import predict_model_costs

    config = puzzle_config_from(model_config)
    return predict_model_costs(config, config.blocks, load_profile(budget))


def evaluate(model: Path, parent: Path | None = None, run_dir: Path = Path("runs/default"), val_blocks: int = 32,
             batch_size: int = 4, mc_tasks: list[str] | None = None, budget: str | None = "h100_80gb",
             measure: bool = True, name: str | None = None, lm_eval_tasks: list[str] | None = None) -> dict[str, Any]:
    """Validation perplexity, KL and top-1 agreement with the parent, multiple choice, throughput.

    Args:
        model: the model to evaluate (a puzzle child, a pruned Llama, or any supported checkpoint)
        parent: the parent to compare with (default: the one recorded in the run directory; none if absent)
        run_dir: the run directory: validation blocks come from run_dir/data, results go to run_dir/eval/NAME.json
        val_blocks: number of validation blocks to evaluate on
        batch_size: validation batch size
        mc_tasks: JSONL multiple-choice task files ({"context", "choices", "label"} per line)
        budget: hardware profile for the predicted throughput (none to skip)
        measure: measure prefill and decode tokens/s on this machine
        name: result name (default: the model directory's name)
        lm_eval_tasks: lm-evaluation-harness task names, local task YAMLs, or MC JSONL files (scored by
            lm-eval's own code); needs lm_eval installed (pip install 'puzzle[lm-eval]'); hub access stays off
    """
    from puzzle.data.blocks import check_token_ids, iterate_batches, load_blocks

    run_dir = Path(run_dir)
    name = name or Path(model).name
    if parent is None and read_run_info(run_dir).get("parent"):
        parent = Path(read_run_info(run_dir)["parent"])
    mc_items = {Path(p).stem: load_mc_tasks(p) for p in (mc_tasks or [])}  # fail fast on bad task files
    blocks = load_blocks(run_dir, "val")[:val_blocks]
    subject = load_model(model)
    check_token_ids(blocks, subject.config.vocab_size)
    if parent is None:
        reference = None
    elif Path(parent).resolve() == Path(model).resolve():
        reference = subject  # the parent against itself: KL 0 and agreement 1, from one forward
    else:
        reference = load_model(parent)
    if reference is not None and reference.config.vocab_size != subject.config.vocab_size:
        raise PuzzleError(f"{model} and its parent {parent} have different vocabularies")
    started = time.perf_counter()
    result: dict[str, Any] = {"model": str(model), "parent": str(parent) if parent else None, "name": name}
    result["params"] = sum(p.numel() for p in subject.parameters())
    result["validation"] = quality_metrics(subject, iterate_batches(blocks, batch_size, shuffle=False, seed=0), reference)
    if mc_items:
        tokenizer = load_tokenizer(model)
        result["multiple_choice"] = {task: evaluate_mc(subject, tokenizer, items) for task, items in mc_items.items()}
    if lm_eval_tasks:
        from .lm_eval_adapter import run_lm_eval

        result["lm_eval"] = run_lm_eval(subject, load_tokenizer(model), lm_eval_tasks)
    if measure:
        result["measured"] = measure_throughput(subject, subject.config.vocab_size)
    if budget and budget.lower() != "none":
        result["predicted"] = {"budget": budget, **predicted_costs(subject.config, budget)}
    result["wall_s"] = time.perf_counter() - started
    atomic_write_json(run_dir / "eval" / f"{name}.json", result)
    v = result["validation"]
    line = f"{name}: ppl {v['perplexity']:.3f}"
    if "kl" in v:
        line += f", KL {v['kl']:.4f}, top-1 agreement {v['top1_agreement']:.3f}"
    print(line + f"  -> {run_dir / 'eval' / (name + '.json')}")
    return result
