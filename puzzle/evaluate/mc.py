"""Multiple-choice evaluation on local JSONL tasks: {"context": str, "choices": [str, ...], "label": int}.

Each choice is scored by the model's summed log-probability of its tokens after the context, as
lm-evaluation-harness does: `acc` picks the highest sum, `acc_norm` the highest sum per byte of the
choice (so long choices are not penalised for their length).
"""

import json
import random
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from puzzle.errors import PuzzleError


def load_mc_tasks(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise PuzzleError(f"multiple-choice task file not found: {path}")
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise PuzzleError(f"{path}:{n}: not valid JSON") from None
        ok = (isinstance(item, dict) and isinstance(item.get("context"), str) and isinstance(item.get("choices"), list)
              and len(item["choices"]) >= 2 and all(isinstance(c, str) and c for c in item["choices"])
              and isinstance(item.get("label"), int) and 0 <= item["label"] < len(item["choices"]))
        if not ok:
            raise PuzzleError(f"{path}:{n}: expected {{'context': str, 'choices': [str, ...], 'label': index}}")
        items.append(item)
    if not items:
        raise PuzzleError(f"{path}: no multiple-choice items")
    return items


@torch.no_grad()
def choice_logprobs(model: Any, tokenizer: Any, context: str, choices: list[str]) -> list[float]:
    """Summed log p(choice tokens | context) for each choice, in one batch (right-padded)."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    seqs = [ctx + tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    logp = F.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), dim=-1)
    out = []
    for i, s in enumerate(seqs):
        positions = torch.arange(len(ctx) - 1, len(s) - 1)  # logits at p predict token p + 1
        targets = torch.tensor(s[len(ctx):])
        out.append(logp[i, positions, targets].sum().item())
    return out


def evaluate_mc(model: Any, tokenizer: Any, items: Iterable[dict[str, Any]]) -> dict[str, float]:
    correct = correct_norm = n = 0
    for item in items:
        scores = choice_logprobs(model, tokenizer, item["context"], item["choices"])
        norm = [s / max(1, len(c.encode())) for s, c in zip(scores, item["choices"])]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == item["label"])
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == item["label"])
        n += 1
    return {"acc": correct / n, "acc_norm": correct_norm / n, "items": n}


def build_cloze_tasks(documents: list[str], n_items: int, seed: int = 0, n_choices: int = 4,
                      context_words: int = 40, answer_words: int = 8) -> list[dict[str, Any]]:
    """A cloze task from held-out prose: a passage, its true next words, and distractors taken from
    the same position in other passages (same length in words, so no length cue)."""
    rng = random.Random(seed)
    spans = []
    for doc in documents:
        words = doc.split()
        for start in range(0, len(words) - context_words - answer_words, context_words + answer_words):
            spans.append((" ".join(words[start:start + context_words]),
                          " " + " ".join(words[start + context_words:start + context_words + answer_words])))
    if len(spans) < n_choices:
        raise PuzzleError(f"not enough held-out text to build a cloze task ({len(spans)} passages)")
    rng.shuffle(spans)
    items = []
    for i, (context, answer) in enumerate(spans[:n_items]):
        others = list(dict.fromkeys(a for _, a in spans if a != answer))  # distinct distractors
        if len(others) < n_choices - 1:
            raise PuzzleError("held-out text is too repetitive to draw distinct distractors")
        choices = rng.sample(others, n_choices - 1) + [answer]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(answer)})
    return items


def validation_documents(run_dir: str | Path) -> list[str]:
    """The held-out documents of a prepared run (the same split prepare-data made)."""
    from puzzle.data import Corpus, load_meta, split_documents

    meta = load_meta(run_dir)
    docs = list(Corpus(meta["corpus"]))
    is_val = split_documents(len(docs), meta["val_fraction"], meta["seed"])
    return [d for d, v in zip(docs, is_val) if v]


def build_mc(run_dir: Path = Path("runs/default"), items: int = 100, seed: int = 0) -> Path:
    """Write run_dir/eval/cloze.jsonl: a 4-way cloze task from the run's held-out documents."""
    from puzzle.io import atomic_write_text

    tasks = build_cloze_tasks(validation_documents(run_dir), items, seed=seed)
    out = Path(run_dir) / "eval" / "cloze.jsonl"
    atomic_write_text(out, "".join(json.dumps(t) + "\n" for t in tasks))
    return out
