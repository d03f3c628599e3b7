import copy
import json
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from puzzle.cli import main
from puzzle.data.corpus import Corpus
from puzzle.data.prepare import prepare_blocks, split_documents
from puzzle.evaluate.mc import build_cloze_tasks, build_mc, choice_logprobs, choice_scores, evaluate_mc, load_mc_tasks
from puzzle.evaluate.quality import quality_metrics
from puzzle.errors import PuzzleError

from conftest import SAMPLE_TEXT


def test_parent_against_itself_has_zero_kl_and_full_agreement(tiny_parent):
    batches = [torch.randint(0, 320, (2, 16)) for _ in range(2)]
    same = quality_metrics(tiny_parent, batches, tiny_parent)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0
    other = copy.deepcopy(tiny_parent)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.mul_(3.0)
    moved = quality_metrics(other, batches, tiny_parent)
    assert moved["kl"] > 1e-3 and moved["top1_agreement"] < 1.0
    # the LM loss is the mean next-token cross-entropy
    with torch.no_grad():
        logits = torch.cat([tiny_parent(b).logits[:, :-1] for b in batches]).reshape(-1, 320)
    targets = torch.cat([b[:, 1:] for b in batches]).reshape(-1)
    assert same["lm_loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)


def _one_at_a_time(model, ctx: list[int], choice: list[int]) -> float:
    ids = ctx + choice
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    return sum(logp[p - 1, ids[p]].item() for p in range(len(ctx), len(ids)))


@pytest.mark.parametrize("kind", ["puzzle", "llama"])
def test_choice_logprobs_match_one_sequence_at_a_time(kind, tiny_parent, tiny_llama, tiny_tokenizer):
    """Packing the choices after one context (4D mask, restarted positions) gives each choice's own log p."""
    model = tiny_parent if kind == "puzzle" else tiny_llama
    context, choices = "A list is a", [" mutable sequence", " dog", " tuple that lets you work"]
    batched = choice_logprobs(model, tiny_tokenizer, context, choices)
    ctx = tiny_tokenizer(context, add_special_tokens=False)["input_ids"]
    for choice, got in zip(choices, batched):
        want = _one_at_a_time(model, ctx, tiny_tokenizer(choice, add_special_tokens=False)["input_ids"])
        assert got == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("kind", ["puzzle", "llama"])
def test_choice_scores_batch_items_of_different_lengths(kind, tiny_parent, tiny_llama):
    model = tiny_parent if kind == "puzzle" else tiny_llama
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(3, 320, (n,), generator=g).tolist()  # noqa: E731
    items = [(rand(n_ctx), [rand(m) for m in lens]) for n_ctx, lens in [(3, [1, 4]), (12, [2, 2, 7]), (1, [5, 1]), (7, [3])]]
    # a small batch_tokens splits the items over several right-padded batches
    got = choice_scores(model, items, batch_tokens=40)
    for (ctx, choices), scores in zip(items, got):
        assert scores == pytest.approx([_one_at_a_time(model, ctx, c) for c in choices], abs=1e-4)


def test_empty_context_is_scored_after_the_bos_token(tiny_parent, tiny_tokenizer):
    tiny_tokenizer.bos_token = tiny_tokenizer.convert_ids_to_tokens(1)
    got = choice_logprobs(tiny_parent, tiny_tokenizer, "", [" list", " dog"])
    for choice, score in zip([" list", " dog"], got):
        want = _one_at_a_time(tiny_parent, [1], tiny_tokenizer(choice, add_special_tokens=False)["input_ids"])
        assert score == pytest.approx(want, abs=1e-4)


def test_cloze_tasks_are_valid_and_scored(tiny_parent, tiny_tokenizer, tmp_path):
    docs = [" ".join(SAMPLE_TEXT[i:] + SAMPLE_TEXT[:i]) * 3 for i in range(5)]
    items = build_cloze_tasks(docs, n_items=6, context_words=10, answer_words=3)
    assert len(items) == 6
    for item in items:
        assert len(set(item["choices"])) == 4 and 0 <= item["label"] < 4
    path = tmp_path / "cloze.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    result = evaluate_mc(tiny_parent, tiny_tokenizer, load_mc_tasks(path))
    assert result["items"] == 6 and 0.0 <= result["acc"] <= 1.0


def test_build_mc_draws_from_the_recorded_held_out_documents_not_the_corpus(tiny_tokenizer, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [f"Document {i}: " + " ".join(SAMPLE_TEXT[j % 5] for j in range(i, i + 30)) for i in range(12)]
    for i, doc in enumerate(docs):
        (corpus / f"{i:02d}.txt").write_text(doc)
    run = tmp_path / "run"
    prepare_blocks(Corpus(corpus), tiny_tokenizer, run / "data", seq_len=16, val_fraction=0.25, seed=1,
                   source=str(corpus))
    held_out = [d for d, v in zip(Corpus(corpus), split_documents(len(docs), 0.25, 1)) if v]
    want = build_cloze_tasks(held_out, 4, seed=0)
    shutil.rmtree(corpus)  # the corpus is not read again
    items = load_mc_tasks(build_mc(run, items=4, seed=0))
    assert items == want
    assert all(any(item["context"] in d for d in held_out) for item in items)


def test_bad_task_file_is_refused(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "x", "choices": ["a"], "label": 0}\n')
    with pytest.raises(PuzzleError, match="bad.jsonl:1"):
        load_mc_tasks(path)


def test_evaluate_command_writes_json(tiny_parent_dir, tiny_tokenizer, tmp_path, capsys):
    run = tmp_path / "run"
    prepare_blocks([t * 20 for t in SAMPLE_TEXT], tiny_tokenizer, run / "data", seq_len=32, val_fraction=0.4)
    tasks = tmp_path / "t.jsonl"
    tasks.write_text(json.dumps({"context": "The quick brown", "choices": [" fox", " list"], "label": 0}) + "\n")
    code = main(["evaluate", str(tiny_parent_dir), "--parent", str(tiny_parent_dir), "--run-dir", str(run),
                 "--mc-tasks", str(tasks), "--budget", "none", "--name", "self"])
    assert code == 0, capsys.readouterr().err
    out = json.loads((run / "eval" / "self.json").read_text())
    assert out["validation"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert out["multiple_choice"]["t"]["items"] == 1
    assert out["measured"]["decode_tokens_per_s"] > 0 and np.isfinite(out["validation"]["perplexity"])


def test_lm_eval_adapter_says_when_lm_eval_is_missing(tiny_parent, tiny_tokenizer, monkeypatch):
    from puzzle.evaluate.lm_eval_adapter import run_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(PuzzleError, match="lm-evaluation-harness is not installed"):
        run_lm_eval(tiny_parent, tiny_tokenizer, ["tasks/cloze.yaml"])


def test_yaml_task_name_is_read_from_the_file(tmp_path):
    from puzzle.evaluate.lm_eval_adapter import yaml_task_name

    task = tmp_path / "whatever.yaml"
    task.write_text("# a local task\ntask: 'my_cloze'\ndoc_to_text: !function utils.doc_to_text\n")
    assert yaml_task_name(task) == "my_cloze"
    (tmp_path / "nameless.yaml").write_text("dataset_path: json\n")
    with pytest.raises(PuzzleError, match="no 'task:' name"):
        yaml_task_name(tmp_path / "nameless.yaml")


@pytest.mark.slow
def test_lm_eval_scores_our_cloze_items_as_we_do(tiny_parent, tiny_tokenizer, tmp_path):
    """lm-evaluation-harness's own loglikelihood code, on the same JSONL items (turned into a task YAML by the
    adapter), picks the same choices as puzzle.evaluate.mc: identical acc and acc_norm."""
    pytest.importorskip("lm_eval")
    from puzzle.evaluate.lm_eval_adapter import run_lm_eval

    docs = [" ".join(SAMPLE_TEXT[i:] + SAMPLE_TEXT[:i]) * 3 for i in range(5)]
    items = build_cloze_tasks(docs, n_items=12, context_words=10, answer_words=3)
    path = tmp_path / "cloze.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    ours = evaluate_mc(tiny_parent, tiny_tokenizer, items)
    theirs = run_lm_eval(tiny_parent, tiny_tokenizer, [str(path)])["puzzle_cloze"]
    assert 0 < ours["acc"] < 1  # a random model: a mix of right and wrong answers, so the match means something
    assert theirs["acc"] == pytest.approx(ours["acc"]) and theirs["acc_norm"] == pytest.approx(ours["acc_norm"])
    with pytest.raises(PuzzleError, match="unknown lm-eval task"):
        run_lm_eval(tiny_parent, tiny_tokenizer, ["no_such_task_anywhere"])
