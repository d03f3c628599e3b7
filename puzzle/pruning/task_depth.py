"""Depth pruning by downstream accuracy (`prune --depth-method task`), as Llama-3.1-Minitron chose its layers.

Minitron found that the LM loss after removing layers does not track downstream accuracy, and picked the
contiguous block to drop (layers 16-31 of Llama-3.1-8B) by Winogrande accuracy with that block removed.
Here every contiguous window of the requested depth k is removed in turn (L - k + 1 windows, each scored
with the model's other layers unchanged) and scored by the normalised multiple-choice accuracy
(`acc_norm`, per byte of the choice, as `puzzle evaluate` reports it) on a held-out slice of the run's
cloze task; the window with the highest accuracy goes, ties broken by the mean per-byte log-probability
of the right choice (a continuous score, so a small item set still ranks every window), then by the
lower start.

Contiguous windows, not a greedy drop of one layer at a time: Minitron's choice, the same candidates as
`--depth-method block` (so the two differ only in the score), and L - k + 1 evaluations instead of the
greedy search's k(2L - k + 1)/2 (19 vs 294 for 12 of SmolLM2's 30 layers), which a CPU run can afford.

The slice (`selection_items`): the run's cloze task (`puzzle build-mc`) takes the first N passages of one
fixed seeded order of the held-out passages; the selection takes the last `n` of the same order, so
every `build-mc --items` up to (passages - n) is disjoint from it, and any item of an existing
RUN/eval/cloze.jsonl is removed from it as well. A user's own task file (`--task-file`, e.g. a converted
Winogrande dev split) is used whole, minus the items of RUN/eval/cloze.jsonl. The split is recorded in
the pruned checkpoint's pruning.json (`task_depth`).
"""

import hashlib
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from puzzle.data.blocks import load_held_out_documents
from puzzle.errors import PuzzleError
from puzzle.evaluate.mc import (build_cloze_tasks, build_mc, choice_scores, evaluate_mc, load_mc_tasks, per_byte_scores,
                                tokenize_items)
from puzzle.run_dir import RunDir

MIN_TASK_ITEMS = 20  # below this one wrong answer moves the accuracy by 5 points or more
CLOZE_SEED = 0  # build-mc's default seed: the order whose head the evaluation task takes
# build-mc's default item count: the selection must leave at least that many passages to the evaluation
EVAL_ITEMS_DEFAULT = inspect.signature(build_mc).parameters["items"].default
# the batching `puzzle evaluate` scores with (padding can move the last bits of a log-probability)
EVAL_BATCH_TOKENS = inspect.signature(evaluate_mc).parameters["batch_tokens"].default


def items_sha256(items: list[dict[str, Any]]) -> str:
    return hashlib.sha256("".join(json.dumps(i, sort_keys=True) + "\n" for i in items).encode()).hexdigest()


def _eval_contexts(run_dir: Path) -> tuple[set[str], str | None]:
    """The contexts of the run's evaluation task (RUN/eval/cloze.jsonl), if it has been built."""
    path = RunDir(run_dir).mc_tasks
    if not path.exists():
        return set(), None
    return {item["context"] for item in load_mc_tasks(path)}, str(path)


def selection_items(run_dir: Path, n_items: int, task_file: Path | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The held-out slice the windows are scored on and the record of the split (see the module docstring)."""
    if n_items < MIN_TASK_ITEMS:
        raise PuzzleError(f"--task-items must be at least {MIN_TASK_ITEMS}, got {n_items}")
    eval_contexts, eval_file = _eval_contexts(run_dir)
    if task_file is not None:
        items = load_mc_tasks(task_file)
        kept = [i for i in items if i["context"] not in eval_contexts]
        if len(kept) < MIN_TASK_ITEMS:
            raise PuzzleError(f"{task_file}: {len(kept)} items outside the run's evaluation task, fewer than the "
                              f"{MIN_TASK_ITEMS} the task depth method needs")
        split = {"source": str(task_file), "items": len(kept), "excluded_eval_items": len(items) - len(kept)}
        return kept, {**split, "eval_task": eval_file, "items_sha256": items_sha256(kept)}
    # every held-out passage as a cloze item, in build-mc's order (its task is a prefix of this list)
    order = build_cloze_tasks(load_held_out_documents(run_dir), sys.maxsize, seed=CLOZE_SEED)
    if len(order) < n_items + EVAL_ITEMS_DEFAULT:
        raise PuzzleError(f"the run's held-out text gives {len(order)} cloze passages, fewer than --task-items "
                          f"{n_items} plus the {EVAL_ITEMS_DEFAULT} left to the evaluation task; lower --task-items "
                          "or prepare-data with more validation text (--val-fraction)")
    tail = order[len(order) - n_items:]
    kept = [i for i in tail if i["context"] not in eval_contexts]
    if len(kept) < MIN_TASK_ITEMS:
        raise PuzzleError(f"only {len(kept)} held-out cloze passages are left outside {eval_file}, fewer than the "
                          f"{MIN_TASK_ITEMS} the task depth method needs")
    split = {
        "source": f"held-out cloze passages (build-mc order, seed {CLOZE_SEED})",
        "passages": len(order),
        "positions": [len(order) - n_items, len(order)],  # the slice of the order scored here
        "eval_disjoint_up_to": len(order) - n_items,  # build-mc --items up to this stays disjoint
        "items": len(kept),
        "excluded_eval_items": len(tail) - len(kept),
    }
    return kept, {**split, "eval_task": eval_file, "items_sha256": items_sha256(kept)}


def _task_scores(model: Any, tokens: list, items: list[dict[str, Any]], pad_id: int) -> dict[str, float]:
    """acc, acc_norm and the mean per-byte log-probability of the right choice over `items`."""
    scores = choice_scores(model, tokens, pad_id, EVAL_BATCH_TOKENS)
    acc = acc_norm = logp = 0.0
    for item, s in zip(items, scores):
        norm = per_byte_scores(s, item["choices"])
        acc += max(range(len(s)), key=s.__getitem__) == item["label"]
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == item["label"]
        logp += norm[item["label"]]
    n = len(items)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "correct_logp_per_byte": logp / n}


class _Prefix(nn.Module):
    """Stands for layers 0..s-1 in the forward of window s (layers s..s+k-1 removed): returns their output on
    each batch, recorded while window s-1 was scored (the embeddings for window 0), and runs layer s on it
    for window s + 1. So each window costs its suffix and one layer instead of the whole model: for 12 of
    SmolLM2's 30 layers, 189 layer passes instead of 342. `choice_scores` batches the same items the same
    way on every call, so the n-th call is the n-th batch; PuzzleModel hands every layer (hidden, position
    embeddings, mask, cache, cache index)."""

    has_kv_cache = False

    def __init__(self, cached: list[torch.Tensor] | None, advance: nn.Module | None) -> None:
        super().__init__()
        self.cached = cached  # per batch; None: this batch's embeddings, the forward's own input
        self.advance = [advance]  # in a list: not a submodule of this one
        self.outputs: list[torch.Tensor | None] = []

    def forward(self, h: torch.Tensor, *layer_args: Any) -> torch.Tensor:
        x = h if self.cached is None else self.cached[len(self.outputs)]
        layer = self.advance[0]
        self.outputs.append(None if layer is None else layer(x, *layer_args))
        return x


@torch.no_grad()
def score_windows(model: Any, tokenizer: Any, items: list[dict[str, Any]], k: int,
                  progress: bool = True) -> dict[str, Any]:
    """The intact model's scores and those with each contiguous window of `k` layers removed
    (a PuzzleForCausalLM: `to_puzzle` of the parent)."""
    full = model.model.layers
    L = len(full)
    if not 0 < k < L:
        raise PuzzleError(f"cannot drop {k} of {L} layers (at least one must stay)")
    model.eval()
    tokens = tokenize_items(tokenizer, items)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    intact = _task_scores(model, tokens, items, pad_id)
    windows, cached = [], None
    try:
        for start in tqdm(range(L - k + 1), desc=f"task depth (k={k})", unit="window", disable=not progress):
            prefix = _Prefix(cached, full[start] if start < L - k else None)
            model.model.layers = nn.ModuleList([prefix, *full[start + k:]])
            windows.append({"start": start, **_task_scores(model, tokens, items, pad_id)})
            if cached is not None and len(prefix.outputs) != len(cached):  # the replay's one assumption
                raise RuntimeError(f"window {start}: {len(prefix.outputs)} batches, {len(cached)} before")
            cached = prefix.outputs
    finally:
        model.model.layers = full
    return {"intact": intact, "windows": windows}


def best_window(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Highest acc_norm, then highest per-byte log-probability of the right choice, then the lowest start."""
    return min(windows, key=lambda w: (-w["acc_norm"], -w["correct_logp_per_byte"], w["start"]))


def task_layers_to_drop(model: Any, tokenizer: Any, items: list[dict[str, Any]], split: dict[str, Any], n: int,
                        progress: bool = True) -> tuple[list[int], dict[str, Any]]:
    """The `n` contiguous layers whose removal keeps the most accuracy on `items` (from `selection_items`,
    whose record of the split is `split`), and the record for pruning.json."""
    scored = score_windows(model, tokenizer, items, n, progress)
    best = best_window(scored["windows"])
    record = {"window": n, "split": split, **scored, "chosen": best}
    return list(range(best["start"], best["start"] + n)), record


__all__ = ["MIN_TASK_ITEMS", "best_window", "score_windows", "selection_items", "task_layers_to_drop"]
