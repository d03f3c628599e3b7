"""`prune --depth-method task`: the contiguous window whose removal keeps the most multiple-choice accuracy,
scored on a held-out slice disjoint from the evaluation task; refusals in one line; determinism."""

import json
import random

import pytest
import torch
from conftest import SAMPLE_TEXT, make_llama, make_tokenizer
from torch import nn

from puzzle.cli import main
from puzzle.data.prepare import prepare_blocks
from puzzle.errors import PuzzleError
from puzzle.evaluate.mc import build_mc, choice_scores, load_mc_tasks, per_byte_scores, tokenize_items
from puzzle.model.checkpoint import to_puzzle
from puzzle.pruning.commands import importance, prune
from puzzle.pruning.prune import layers_to_drop
from puzzle.pruning.task_depth import (MIN_TASK_ITEMS, _task_scores, best_window, score_windows,
                                       selection_items, task_layers_to_drop)
from puzzle.run_dir import RunDir

WORDS = sorted({w.strip(".;,") for t in SAMPLE_TEXT for w in t.split()})
IDENTITY = (2, 3)  # the layers made no-ops: removing them changes nothing


def _parent(layers: int = 6) -> nn.Module:
    """A random Llama whose layers 2 and 3 add nothing to the residual stream (o_proj, down_proj zero)."""
    model = make_llama(num_hidden_layers=layers)
    with torch.no_grad():
        for i in IDENTITY:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    return model


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _known_task(model, tokenizer, n: int = 24, seed: int = 0) -> list[dict]:
    """Items labelled with the intact model's own acc_norm answer: the intact model scores 1.0, and so does
    the model without the no-op layers (same logits); any other window loses items."""
    rng = random.Random(seed)
    items = [{"context": _text(rng, 8), "choices": [" " + _text(rng, 2) for _ in range(4)], "label": 0} for _ in range(n)]
    scores = choice_scores(model, tokenize_items(tokenizer, items))
    for item, s in zip(items, scores):
        norm = per_byte_scores(s, item["choices"])
        item["label"] = max(range(4), key=norm.__getitem__)
    return items


def _naive_window_scores(model, tokenizer, items, k):
    """Each window scored by the plain forward of the model without it (what the prefix replay must equal)."""
    full, out = model.model.layers, []
    tokens = tokenize_items(tokenizer, items)
    try:
        for s in range(len(full) - k + 1):
            model.model.layers = nn.ModuleList(layer for i, layer in enumerate(full) if not s <= i < s + k)
            out.append({"start": s, **_task_scores(model, tokens, items, tokenizer.pad_token_id)})
    finally:
        model.model.layers = full
    return out


def test_task_method_drops_the_window_that_keeps_the_accuracy(monkeypatch):
    from puzzle.pruning import task_depth

    monkeypatch.setattr(task_depth, "EVAL_BATCH_TOKENS", 128)  # several batches: the replay's n-th call is batch n
    tokenizer = make_tokenizer()
    model = to_puzzle(_parent())
    items = _known_task(model, tokenizer)
    scored = score_windows(model, tokenizer, items, 2, progress=False)
    assert scored["intact"]["acc_norm"] == 1.0
    by_start = {w["start"]: w for w in scored["windows"]}
    assert by_start[2] == {"start": 2, **scored["intact"]}  # no-op layers: the intact model's very scores
    assert all(w["acc_norm"] < 1.0 for s, w in by_start.items() if s != 2)  # the construction holds
    drop, record = task_layers_to_drop(model, tokenizer, items, {"source": "test"}, 2, progress=False)
    assert drop == [2, 3] and record["chosen"]["start"] == 2 and record["window"] == 2
    # the prefix replay scores every window exactly as the model without that window does
    assert scored["windows"] == _naive_window_scores(model, tokenizer, items, 2)
    assert len(model.model.layers) == 6  # the layers are back


def test_ties_break_on_the_right_choice_log_probability_then_the_lower_start():
    windows = [{"start": 0, "acc_norm": 0.5, "correct_logp_per_byte": -1.0},
               {"start": 1, "acc_norm": 0.75, "correct_logp_per_byte": -2.0},
               {"start": 2, "acc_norm": 0.75, "correct_logp_per_byte": -1.5},
               {"start": 3, "acc_norm": 0.75, "correct_logp_per_byte": -1.5}]
    assert best_window(windows)["start"] == 2
    with pytest.raises(PuzzleError, match="task_depth"):
        layers_to_drop({}, 2, "task")


def _held_out_run(tmp_path, tokenizer, docs: int = 60, words: int = 500):
    """A run directory with prepared data whose held-out half gives ~5 cloze passages a document."""
    rng = random.Random(1)
    run = tmp_path / "run"
    prepare_blocks([_text(rng, words) for _ in range(docs)], tokenizer, run / "data", seq_len=24, val_fraction=0.5)
    return run


def test_selection_slice_is_disjoint_from_the_evaluation_task_and_recorded(tmp_path):
    tokenizer = make_tokenizer()
    run = _held_out_run(tmp_path, tokenizer)
    items, split = selection_items(run, 30)
    assert len(items) == split["items"] == 30 and split["excluded_eval_items"] == 0 and split["eval_task"] is None
    passages = split["passages"]
    assert split["positions"] == [passages - 30, passages] and split["eval_disjoint_up_to"] == passages - 30
    contexts = {i["context"] for i in items}
    # build-mc's task is a prefix of the same order: disjoint up to eval_disjoint_up_to items, not one more
    eval_items = load_mc_tasks(build_mc(run, items=split["eval_disjoint_up_to"]))
    assert not contexts & {i["context"] for i in eval_items}
    eval_items = load_mc_tasks(build_mc(run, items=split["eval_disjoint_up_to"] + 1))
    assert len(contexts & {i["context"] for i in eval_items}) == 1
    # an evaluation task the selection would overlap (this one, or another seed's) is left out, and counted
    again, split = selection_items(run, 30)
    assert len(again) == 29 and split["excluded_eval_items"] == 1 and split["eval_task"] == str(RunDir(run).mc_tasks)
    assert not {i["context"] for i in again} & {i["context"] for i in eval_items}
    assert selection_items(run, 30) == (again, split)  # deterministic


def _fail_line(capsys, argv) -> str:
    capsys.readouterr()  # what earlier steps printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("puzzle: error:"), err
    return err[0]


def test_prune_task_command_end_to_end_and_its_refusals(tmp_path, capsys):
    tokenizer = make_tokenizer()
    parent_dir = tmp_path / "parent"
    _parent().save_pretrained(parent_dir, safe_serialization=True)
    tokenizer.save_pretrained(parent_dir)
    run = _held_out_run(tmp_path, tokenizer)
    importance(parent_dir, run_dir=run, n_samples=8, seq_len=12, batch_size=4, block_sizes=[1], drop_samples=4)
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(i) + "\n" for i in _known_task(to_puzzle(_parent()), tokenizer)))

    out = prune(parent_dir, tmp_path / "by_task", run_dir=run, drop_layers=2, depth_method="task", task_file=task)
    record = json.loads((out / "pruning.json").read_text())
    assert record["dropped_layers"] == [2, 3] and record["depth_method"] == "task"
    assert record["task_depth"]["split"]["source"] == str(task) and len(record["task_depth"]["windows"]) == 5
    again = prune(parent_dir, tmp_path / "again", run_dir=run, drop_layers=2, depth_method="task", task_file=task)
    assert json.loads((again / "pruning.json").read_text())["task_depth"] == record["task_depth"]  # deterministic

    # the run's own held-out slice, by the CLI
    assert main(["prune", str(parent_dir), str(tmp_path / "cloze"), "--run-dir", str(run), "--drop-layers", "2",
                 "--depth-method", "task", "--task-items", "20"]) == 0
    split = json.loads((tmp_path / "cloze" / "pruning.json").read_text())["task_depth"]["split"]
    assert split["items"] == 20 and "held-out cloze" in split["source"]

    base = ["prune", str(parent_dir), str(tmp_path / "refused"), "--drop-layers", "2", "--depth-method", "task"]
    assert f"at least {MIN_TASK_ITEMS}" in _fail_line(capsys, [*base, "--run-dir", str(run), "--task-items", "5"])
    assert "fewer than --task-items" in _fail_line(capsys, [*base, "--run-dir", str(run), "--task-items", "100000"])
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(i) + "\n" for i in load_mc_tasks(task)[:5]))
    assert "fewer than the" in _fail_line(capsys, [*base, "--run-dir", str(run), "--task-file", str(small)])
    # held-out documents missing (prepared before they were recorded, or removed)
    (run / "data" / "val_documents.jsonl").unlink()
    assert "val_documents.jsonl" in _fail_line(capsys, [*base, "--run-dir", str(run)])
    assert not (tmp_path / "refused").exists()


def test_plan_prices_the_task_scoring():
    """`puzzle plan`: pruning by task accuracy costs forward passes over the items (no FLOPs for the others)."""
    from puzzle import footprint
    from puzzle.pruning.cost import TASK_ITEM_TOKENS, task_forwards
    from puzzle.search_space import load_search_space
    from puzzle.shape import ModelShape
    from puzzle.stages import BY_NAME

    config = make_llama(num_hidden_layers=6).config
    cpu = footprint.Machine("cpu", 0, host_bytes=0, gpu_bytes=0, cpu_flops=1, gpu_flops=0, throughput_note="")
    shape = ModelShape.from_config(config)
    ctx = footprint.Context(config, shape, load_search_space("tiny", config), 32, 0, cpu)
    prune_ = BY_NAME["prune"]
    assert prune_.estimate(ctx, {"out": "o", "drop_layers": 2, "depth_method": "block"}).flops == 0
    est = prune_.estimate(ctx, {"out": "o", "drop_layers": 2, "depth_method": "task", "task_items": 50})
    per_item = TASK_ITEM_TOKENS * shape.model_flops_per_token(None, TASK_ITEM_TOKENS / 2)
    assert est.flops == pytest.approx(50 * per_item * task_forwards(6, 2)) and est.seconds is None
    # intact + windows 0..4 of 2 layers: suffixes 4, 3, 2, 1, 0 layers, a prefix layer for each but the last
    assert task_forwards(6, 2) == pytest.approx(1 + (10 + 4) / 6)
