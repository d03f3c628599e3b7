"""Distillation losses with bounded memory: forward KL, LM loss and top-1 agreement from final hidden
states, a chunk of tokens at a time; cosine / MSE losses between intermediate hidden states.

Logits over a 49K vocabulary are the memory hog (8 x 256 tokens x 49152 x 4 bytes = 400 MB per model,
twice that with their gradient). `kd_terms` never holds more than one chunk of them: it maps
`chunk_tokens` final hidden states through both LM heads, reduces the chunk to three sums, and, when
the student needs gradients, recomputes the chunk's logits in backward (activation checkpointing)
instead of keeping them.

Shapes: N tokens (batch x sequence flattened), D student hidden, Dt teacher hidden, V vocabulary.
"""

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
HiddenLoss = Literal["none", "cosine", "mse"]


@dataclass
class KDTerms:
    """Sums over the tokens of a batch (divide by `tokens` / `lm_tokens` for means)."""

    kl: torch.Tensor  # sum over tokens of T^2 * KL(teacher || student) at temperature T
    lm: torch.Tensor  # sum over labelled tokens of the student's cross-entropy
    agree: torch.Tensor  # number of tokens where the student's argmax is the teacher's
    tokens: int
    lm_tokens: int


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token KL(p_teacher || p_student) of (N, V) logits at `temperature`, times T^2 (Hinton's scaling
    keeps gradient magnitudes comparable across temperatures); float32, shape (N,)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * (t * t)


def _chunk_sums(
    s_h: torch.Tensor,  # (n, D)
    t_logits: torch.Tensor,  # (n, V), no grad
    labels: torch.Tensor,  # (n,)
    s_head: torch.Tensor,  # (V, D)
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s_logits = s_h @ s_head.T
    kl = forward_kl(s_logits, t_logits, temperature).sum()
    lm = F.cross_entropy(s_logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    agree = (s_logits.detach().argmax(-1) == t_logits.argmax(-1)).sum()
    return kl, lm, agree


def kd_terms(
    student_hidden: torch.Tensor,  # (B, T, D) final, normed
    teacher_hidden: torch.Tensor,  # (B, T, Dt) final, normed; or the teacher's logits (B, T, V), see below
    student_head: nn.Linear,
    teacher_head: nn.Linear | None,
    input_ids: torch.Tensor | None = None,  # (B, T): LM labels are the next tokens; None skips the LM loss
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
) -> KDTerms:
    """KL to the teacher, LM loss and top-1 agreement over every token, `chunk_tokens` tokens at a time.

    KL and agreement cover all B*T positions; the LM loss covers the B*(T-1) positions with a next token.
    With `teacher_head=None`, `teacher_hidden` holds the teacher's logits themselves (worth it when one
    teacher is compared with many students, as in the drop-layer scores).
    """
    B, T, _ = student_hidden.shape
    s_h = student_hidden.reshape(B * T, -1)
    t_h = teacher_hidden.reshape(B * T, -1).detach()
    if input_ids is not None:
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long, device=s_h.device)
        labels[:, :-1] = input_ids[:, 1:]
        labels = labels.reshape(-1)
        lm_tokens = B * (T - 1)
    else:
        labels = torch.full((B * T,), IGNORE_INDEX, dtype=torch.long, device=s_h.device)
        lm_tokens = 0
    kl = lm = agree = torch.zeros((), device=s_h.device)
    # With one chunk there is nothing to bound: skip the recomputation and keep its logits for backward.
    need_grad = (torch.is_grad_enabled() and (s_h.requires_grad or student_head.weight.requires_grad)
                 and B * T > chunk_tokens)
    for start in range(0, B * T, chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        with torch.no_grad():
            t_logits = teacher_head(t_h[rows]) if teacher_head is not None else t_h[rows]
        if need_grad:
            # recompute each chunk's student logits in backward rather than keep all of them alive
            c_kl, c_lm, c_agree = checkpoint(
                _chunk_sums, s_h[rows], t_logits, labels[rows], student_head.weight, temperature, use_reentrant=False
            )
        else:
            c_kl, c_lm, c_agree = _chunk_sums(s_h[rows], t_logits, labels[rows], student_head.weight, temperature)
        kl, lm, agree = kl + c_kl, lm + c_lm, agree + c_agree
    return KDTerms(kl=kl, lm=lm, agree=agree, tokens=B * T, lm_tokens=lm_tokens)


def hidden_state_loss(
    student: torch.Tensor,  # (B, T, D)
    teacher: torch.Tensor,  # (B, T, Dt)
    kind: HiddenLoss,
    projection: nn.Module | None = None,  # D -> Dt when the widths differ
) -> torch.Tensor:
    """Mean per-token distance between one pair of hidden states: 1 - cosine, or MSE per element."""
    if projection is not None:
        student = projection(student)
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(f"hidden widths differ ({student.shape[-1]} vs {teacher.shape[-1]}) and no projection given")
    teacher = teacher.detach()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    if kind == "mse":
        return F.mse_loss(student.float(), teacher.float())
    raise ValueError(f"unknown hidden-state loss {kind!r}")


def default_layer_map(student_layers: int, teacher_layers: int, kept_layers: list[int] | None = None) -> list[tuple[int, int]]:
    """(student, teacher) indices into `hidden_states` (0 = embeddings, i = after layer i-1) to match.

    A depth-pruned student (its `kept_layers` known) matches each layer's output to the output of the
    teacher layer it came from; otherwise layers are matched proportionally. The last layer always
    maps to the teacher's last.
    """
    if kept_layers is not None:
        if len(kept_layers) != student_layers:
            raise ValueError(f"kept_layers names {len(kept_layers)} layers but the student has {student_layers}")
        pairs = [(i + 1, t + 1) for i, t in enumerate(kept_layers)]
        pairs[-1] = (student_layers, teacher_layers)
        return pairs
    return [(i, round(i * teacher_layers / student_layers)) for i in range(1, student_layers + 1)]


def parse_layer_map(text: str) -> list[tuple[int, int]]:
    """"1:2,2:4" -> [(1, 2), (2, 4)] (student:teacher `hidden_states` indices)."""
    pairs = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        s, sep, t = item.partition(":")
        if not sep or not s.isdigit() or not t.isdigit():
            raise ValueError(f"bad layer map entry {item!r}; expected STUDENT:TEACHER, e.g. 1:2,2:4")
        pairs.append((int(s), int(t)))
    if not pairs:
        raise ValueError("empty layer map")
    return pairs
