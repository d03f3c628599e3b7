"""Validation LM loss / perplexity, and KL(parent || model) and top-1 agreement with the parent."""

from typing import Iterable

import torch
from transformers import PreTrainedModel

from puzzle.errors import PuzzleError
from puzzle.metrics import Sums, kd_terms


def final_hidden(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, D) final normed hidden states: what the LM head reads (ids moved to the model's device)."""
    return model.model(input_ids=input_ids.to(model.device), use_cache=False).last_hidden_state


@torch.no_grad()
def quality_metrics(model: PreTrainedModel, batches: Iterable[torch.Tensor], parent: PreTrainedModel | None = None,
                    chunk_tokens: int = 1024) -> dict[str, float]:
    """`puzzle.metrics` means over `batches` of (B, T) ids. Without a parent, KL and agreement are omitted."""
    sums = Sums()
    for ids in batches:
        h = final_hidden(model, ids)
        teacher = parent if parent is not None else model
        t_h = h if teacher is model else final_hidden(parent, ids)  # a model against itself: one forward
        sums = sums + kd_terms(h, t_h, model.lm_head, teacher.lm_head, input_ids=ids, chunk_tokens=chunk_tokens).sums()
    if sums.tokens == 0:
        raise PuzzleError("no validation tokens to evaluate on")
    return sums.means(teacher=parent is not None)
