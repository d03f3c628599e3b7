"""Distillation losses beyond the output distribution: cosine / MSE between intermediate hidden states,
and which student layer is matched with which teacher layer.

The KL / LM-loss terms of the loss are `puzzle.metrics.kd_terms` (the same function validation and
`evaluate` report with).

Shapes: B batch, T sequence, D student hidden, Dt teacher hidden.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

HiddenLoss = Literal["none", "cosine", "mse"]


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
