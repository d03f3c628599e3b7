"""Validation LM loss / perplexity, and KL(parent || model) and top-1 agreement with the parent."""

import math
from typing import Iterable

import torch
from transformers import PreTrainedModel

from puzzle.distill.losses import kd_terms


def final_hidden(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, D) final normed hidden states: what the LM head reads."""
    return model.model(input_ids=input_ids, use_cache=False).last_hidden_state


@torch.no_grad()
def quality_metrics(model: PreTrainedModel, batches: Iterable[torch.Tensor], parent: PreTrainedModel | None = None,
                    chunk_tokens: int = 1024) -> dict[str, float]:
    """Token-weighted means over `batches` of (B, T) ids. Without a parent, KL and agreement are omitted."""
    kl = lm = agree = 0.0
    tokens = lm_tokens = 0
    for ids in batches:
        h = final_hidden(model, ids)
        teacher = parent if parent is not None else model
        t_h = h if teacher is model else final_hidden(parent, ids)  # a model against itself: one forward
        terms = kd_terms(h, t_h, model.lm_head, teacher.lm_head, input_ids=ids, chunk_tokens=chunk_tokens)
        kl += terms.kl.item()
        lm += terms.lm.item()
        agree += terms.agree.item()
        tokens += terms.tokens
        lm_tokens += terms.lm_tokens
    if tokens == 0:
        from puzzle.errors import PuzzleError

        raise PuzzleError("no validation tokens to evaluate on")
    out = {"lm_loss": lm / lm_tokens, "perplexity": math.exp(lm / lm_tokens), "tokens": tokens}
    if parent is not None:
        out.update({"kl": kl / tokens, "top1_agreement": agree / tokens})
    return out
