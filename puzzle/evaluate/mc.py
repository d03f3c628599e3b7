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
from tqdm.auto import tqdm

from puzzle.data.blocks import load_held_out_documents
from puzzle.errors import PuzzleError
from puzzle.io import atomic_write_text
from puzzle.run_dir import RunDir, writes_run_dir


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


def _item_tokens(tokenizer: Any, context: str, choices: list[str]) -> tuple[list[int], list[list[int]]]:
    """Context ids and each choice's ids. They are tokenised apart, as lm-evaluation-harness does, so a
    choice's tokens are the same in every context; an empty context becomes the BOS (or EOS) token, as there."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    if not ctx:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise PuzzleError("an item has an empty context and the tokenizer has no BOS or EOS token to stand for it")
        ctx = [prefix]
    return ctx, [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]


def _pack(context: list[int], choices: list[list[int]]) -> tuple[list[int], list[int], list[int], list[tuple[int, int, int]]]:
    """One item as one sequence: the context once, then every choice.

    Returns ids, segments (0 = context, k + 1 = choice k), RoPE positions (each choice starts where the
    context ends, as if it followed it alone) and the scored tokens as (index of the hidden state that
    predicts it, token id, k). With the mask of `_packed_mask` every choice sees exactly context + itself,
    so its log-probabilities are those of the unpacked context + choice, while the context runs once
    instead of once per choice (the cloze items: 77 context and 15 choice tokens, so 2.7x fewer tokens).
    """
    n = len(context)
    ids, segments, positions, scored = list(context), [0] * n, list(range(n)), []
    for k, choice in enumerate(choices):
        start = len(ids)
        for u, token in enumerate(choice):
            scored.append((n - 1 if u == 0 else start + u - 1, token, k))
        ids += choice
        segments += [k + 1] * len(choice)
        positions += range(n, n + len(choice))
    return ids, segments, positions, scored


def _packed_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, W) segment ids (-1 = padding) -> bool (B, 1, W, W) attention mask, True = may attend.

    Causal, and a query sees the context and its own segment; pads see only earlier pads (so their rows
    stay finite; their outputs are never read)."""
    W = segments.shape[1]
    causal = torch.ones(W, W, dtype=torch.bool).tril()
    q, k = segments[:, :, None], segments[:, None, :]
    return (causal & (((k == 0) & (q >= 0)) | (k == q)))[:, None]


@torch.no_grad()
def choice_scores(model: Any, items: list[tuple[list[int], list[list[int]]]], pad_id: int = 0,
                  batch_tokens: int = 4096, progress: bool = False) -> list[list[float]]:
    """Summed log p(choice | context) of every choice of every item (context ids, [choice ids, ...]).

    Each item is packed into one sequence (`_pack`); packed items are batched longest first, about
    `batch_tokens` tokens a batch, right-padded. The model gets a 4D mask and explicit position ids, which
    puzzle children and transformers' models both take. The LM head runs only on the positions that
    predict a scored token: for a 49K vocabulary it costs about a fifth of SmolLM2's forward per position.
    """
    packed = [_pack(ctx, choices) for ctx, choices in items]
    order = sorted(range(len(items)), key=lambda i: -len(packed[i][0]))
    batches, current = [], []
    for i in order:  # the first item of a batch is its longest, so its length is the batch's width
        if current and (len(current) + 1) * len(packed[current[0]][0]) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    out = [[0.0] * len(choices) for _, choices in items]
    for batch in tqdm(batches, desc="multiple choice", unit="batch", disable=not progress):
        width = len(packed[batch[0]][0])
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        segments = torch.full((len(batch), width), -1, dtype=torch.long)
        positions = torch.zeros((len(batch), width), dtype=torch.long)
        rows, at, targets = [], [], []
        for r, i in enumerate(batch):
            seq, seg, pos, scored = packed[i]
            ids[r, : len(seq)] = torch.tensor(seq)
            segments[r, : len(seq)] = torch.tensor(seg)
            positions[r, : len(seq)] = torch.tensor(pos)
            rows += [r] * len(scored)
            at += [p for p, _, _ in scored]
            targets += [t for _, t, _ in scored]
        device = model.lm_head.weight.device
        hidden = model.model(input_ids=ids.to(device), attention_mask=_packed_mask(segments).to(device),
                             position_ids=positions.to(device), use_cache=False).last_hidden_state  # (B, W, D)
        logp = F.log_softmax(model.lm_head(hidden[torch.tensor(rows), torch.tensor(at)]).float(), dim=-1)  # (n, V)
        token_logp = logp[torch.arange(len(targets)), torch.tensor(targets)].tolist()
        j = 0
        for i in batch:
            for _, _, k in packed[i][3]:
                out[i][k] += token_logp[j]
                j += 1
    return out


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def choice_logprobs(model: Any, tokenizer: Any, context: str, choices: list[str]) -> list[float]:
    """Summed log p(choice tokens | context) for each choice."""
    return choice_scores(model, [_item_tokens(tokenizer, context, choices)], _pad_id(tokenizer))[0]


def tokenize_items(tokenizer: Any, items: list[dict[str, Any]]) -> list[tuple[list[int], list[list[int]]]]:
    """Each item's (context ids, [choice ids, ...]), the input of `choice_scores`."""
    return [_item_tokens(tokenizer, item["context"], item["choices"]) for item in items]


def per_byte_scores(scores: list[float], choices: list[str]) -> list[float]:
    """Summed log-probabilities per UTF-8 byte of each choice: what acc_norm takes the highest of."""
    return [s / max(1, len(c.encode())) for s, c in zip(scores, choices)]


def evaluate_mc(model: Any, tokenizer: Any, items: Iterable[dict[str, Any]], batch_tokens: int = 2048,
                progress: bool = True) -> dict[str, float]:
    """acc (highest summed log-probability) and acc_norm (highest per byte of the choice) over `items`."""
    items = list(items)
    if not items:
        raise PuzzleError("no multiple-choice items to evaluate")
    tokens = tokenize_items(tokenizer, items)
    all_scores = choice_scores(model, tokens, _pad_id(tokenizer), batch_tokens, progress=progress and len(items) > 8)
    correct = correct_norm = 0
    for item, scores in zip(items, all_scores):
        norm = per_byte_scores(scores, item["choices"])
        correct += int(max(range(len(scores)), key=scores.__getitem__) == item["label"])
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == item["label"])
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items), "items": len(items)}


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


@writes_run_dir("build_mc")
def build_mc(run_dir: Path = Path("runs/default"), items: int = 100, seed: int = 0) -> Path:
    """Write run_dir/eval/cloze.jsonl: a 4-way cloze task from the held-out documents prepare-data recorded."""

    tasks = build_cloze_tasks(load_held_out_documents(run_dir), items, seed=seed)

    out = RunDir(run_dir).mc_tasks
    atomic_write_text(out, "".join(json.dumps(t) + "\n" for t in tasks))
    return out
