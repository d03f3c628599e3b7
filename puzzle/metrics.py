"""Quality of a model against a reference, the one set of metrics every stage reports.

  kl              mean over tokens of KL(teacher || student) over the whole vocabulary
  lm_loss         mean next-token cross-entropy of the student (B*(T-1) labelled tokens per (B, T) batch)
  perplexity      exp(lm_loss)
  top1_agreement  share of tokens where the student's argmax is the teacher's
  tokens          tokens the means are over

Logits over a 49K vocabulary are the memory hog (8 x 256 tokens x 49152 x 4 bytes = 400 MB per model),
so both ways of computing them take `chunk_tokens` tokens at a time:
  `kd_terms`   one teacher, one student, differentiable: distillation's loss and validation, `evaluate`,
               the drop-layer importance. With gradients it recomputes each chunk's student logits in
               backward (activation checkpointing) instead of keeping them.
  `TeacherReference` + `compare`   one teacher, many students (replace-1-block scoring): the teacher's
               probabilities and sum_v p log p are computed once; each student then costs one batched
               dot product per token (KL = sum p log p - sum p log q), no (n, V) temporary beyond its
               own log-probabilities: about half the memory traffic of `F.kl_div`.
Either way the sums are kept per batch (`KDTerms` / `Sums`) and turned into token-weighted means by
`Sums.means`, so every stage's numbers carry the same names (`KEYS`).

Shapes: B batch, T sequence, N = B*T tokens, n tokens of one chunk, D student hidden, Dt teacher hidden,
V vocabulary.
"""

import math
from dataclasses import asdict, dataclass, fields
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from puzzle.errors import PuzzleError

IGNORE_INDEX = -100
KEYS = ("kl", "lm_loss", "perplexity", "top1_agreement", "tokens")


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B*T,) labels: the next token, IGNORE_INDEX at each row's last position."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    return labels.reshape(-1)


@dataclass
class Sums:
    """Sums over the tokens of one or more batches (Python numbers); `means()` gives the metrics."""

    kl: float = 0.0  # sum over tokens of KL(teacher || student)
    lm: float = 0.0  # sum over labelled tokens of the student's cross-entropy
    agree: float = 0.0  # tokens where the student's argmax is the teacher's
    tokens: int = 0
    lm_tokens: int = 0

    def __add__(self, other: "Sums") -> "Sums":
        return type(self)(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def means(self, teacher: bool = True) -> dict[str, float]:
        """Token-weighted means under `KEYS`; without a teacher, KL and agreement are left out."""
        if self.tokens == 0 or self.lm_tokens == 0:
            raise PuzzleError("no validation tokens were scored")
        lm_loss = self.lm / self.lm_tokens
        out = {"lm_loss": lm_loss, "perplexity": math.exp(lm_loss)}
        if teacher:
            out |= {"kl": self.kl / self.tokens, "top1_agreement": self.agree / self.tokens}
        return out | {"tokens": self.tokens}

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Sums":
        return cls(**{f.name: data[f.name] for f in fields(cls)})


# --- one teacher, one student: chunked and differentiable --------------------------------------------

@dataclass
class KDTerms:
    """Sums over the tokens of a batch as tensors (the KL and LM sums carry gradients)."""

    kl: torch.Tensor  # sum over tokens of T^2 * KL(teacher || student) at temperature T
    lm: torch.Tensor  # sum over labelled tokens of the student's cross-entropy
    agree: torch.Tensor  # number of tokens where the student's argmax is the teacher's
    tokens: int
    lm_tokens: int

    def sums(self) -> Sums:
        return Sums(kl=self.kl.item(), lm=self.lm.item(), agree=self.agree.item(), tokens=self.tokens,
                    lm_tokens=self.lm_tokens)


# (n, V) fp32 tensors alive at once inside `_chunk_sums` for a chunk of n tokens (its peak, in `forward_kl`'s
# last line): the student's logits, both log-softmaxes, the teacher's probabilities, their difference and its
# product with them. puzzle/plan.py prices a chunk's loss with it.
KL_CHUNK_TEMPORARIES = 6
CHUNK_TOKENS = 1024  # tokens per chunk of `kd_terms`' loss by default


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token KL(p_teacher || p_student) of (N, V) logits at `temperature`, times T^2 (Hinton's scaling
    keeps gradient magnitudes comparable across temperatures); float32, shape (N,)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * (t * t)


def _chunk_sums(
    s_h: torch.Tensor,  # (n, D)
    t_logits: torch.Tensor | None,  # (n, V), no grad; None: no teacher (KL and agreement are 0)
    labels: torch.Tensor,  # (n,)
    s_head: torch.Tensor,  # (V, D)
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s_logits = s_h @ s_head.T
    lm = F.cross_entropy(s_logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if t_logits is None:
        zero = torch.zeros((), device=s_h.device)
        return zero, lm, zero
    kl = forward_kl(s_logits, t_logits, temperature).sum()
    agree = (s_logits.detach().argmax(-1) == t_logits.argmax(-1)).sum()
    return kl, lm, agree


def kd_terms(
    student_hidden: torch.Tensor,  # (B, T, D) final, normed
    teacher_hidden: torch.Tensor | None,  # (B, T, Dt) final, normed; or the teacher's logits (B, T, V); None: no teacher
    student_head: nn.Linear,
    teacher_head: nn.Linear | None,
    input_ids: torch.Tensor | None = None,  # (B, T): LM labels are the next tokens; None skips the LM loss
    temperature: float = 1.0,
    chunk_tokens: int = CHUNK_TOKENS,
) -> KDTerms:
    """KL to the teacher, LM loss and top-1 agreement over every token, `chunk_tokens` tokens at a time.

    KL and agreement cover all B*T positions; the LM loss covers the B*(T-1) positions with a next token.
    With `teacher_head=None`, `teacher_hidden` holds the teacher's logits themselves (worth it when one
    teacher is compared with many students, as in the drop-layer scores). With `teacher_hidden=None` there is
    no teacher (teacher correction's plain LM loss): the KL and agreement sums are 0, the LM loss as above.
    """
    B, T, _ = student_hidden.shape
    s_h = student_hidden.reshape(B * T, -1)
    t_h = teacher_hidden.reshape(B * T, -1).detach() if teacher_hidden is not None else None
    if input_ids is not None:
        labels = next_token_labels(input_ids.to(s_h.device))
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
            t_logits = None if t_h is None else teacher_head(t_h[rows]) if teacher_head is not None else t_h[rows]
        if need_grad:
            # recompute each chunk's student logits in backward rather than keep all of them alive
            c_kl, c_lm, c_agree = checkpoint(
                _chunk_sums, s_h[rows], t_logits, labels[rows], student_head.weight, temperature, use_reentrant=False
            )
        else:
            c_kl, c_lm, c_agree = _chunk_sums(s_h[rows], t_logits, labels[rows], student_head.weight, temperature)
        kl, lm, agree = kl + c_kl, lm + c_lm, agree + c_agree
    return KDTerms(kl=kl, lm=lm, agree=agree, tokens=B * T, lm_tokens=lm_tokens)


# --- one teacher, many students: the teacher's side computed once --------------------------------------

def log_probs(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """(n, D) final normed hidden -> (n, V) float32 log-probabilities."""
    return F.log_softmax(head(hidden).float(), dim=-1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of (n, V) tensors, (n,), as a batched matmul (no (n, V) product is stored)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(-1)


@dataclass
class TeacherReference:
    """The teacher's distribution over one batch's N tokens, kept to compare many students with.

    Memory: N*V*4 bytes of probabilities (8 x 256 x 49152 x 4 B = 400 MB for SmolLM2).
    """

    probs: list[torch.Tensor]  # per chunk of the N tokens: (n, V) float32
    neg_entropy: torch.Tensor  # (N,) sum_v p log p, float64
    argmax: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,) next tokens, IGNORE_INDEX where there is none
    chunk_tokens: int
    sums: Sums  # the teacher against itself: KL 0, agreement 1, its own LM loss

    def chunks(self) -> Iterator[slice]:
        for start in range(0, self.labels.numel(), self.chunk_tokens):
            yield slice(start, start + self.chunk_tokens)


@torch.no_grad()
def teacher_reference(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 512) -> TeacherReference:
    """The teacher's side of `compare` from its final normed hidden states (N, D) and labels (N,)."""
    if chunk_tokens < 1:
        raise PuzzleError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    N = hidden.shape[0]
    probs, neg_entropy, argmax, lm = [], [], [], 0.0
    for start in range(0, N, chunk_tokens):
        log_p = log_probs(head, hidden[start : start + chunk_tokens])
        p = log_p.exp()
        probs.append(p)
        neg_entropy.append(_dot(p, log_p).double())
        argmax.append(log_p.argmax(-1))
        lm += F.nll_loss(log_p, labels[start : start + chunk_tokens], ignore_index=IGNORE_INDEX, reduction="sum").item()
    lm_tokens = int((labels != IGNORE_INDEX).sum())
    return TeacherReference(
        probs=probs, neg_entropy=torch.cat(neg_entropy), argmax=torch.cat(argmax), labels=labels,
        chunk_tokens=chunk_tokens,
        # the teacher against itself: KL 0 and agreement 1 by definition
        sums=Sums(kl=0.0, lm=lm, agree=float(N), tokens=N, lm_tokens=lm_tokens),
    )


@torch.no_grad()
def compare(ref: TeacherReference, head: nn.Module, hidden: torch.Tensor) -> Sums:
    """The sums of a student whose final normed hidden states on `ref`'s tokens are `hidden` (N, D)."""
    kl = lm = agree = 0.0
    for p, rows in zip(ref.probs, ref.chunks()):
        log_q = log_probs(head, hidden[rows])
        kl += (ref.neg_entropy[rows] - _dot(p, log_q).double()).sum().item()  # sum p log p - sum p log q
        lm += F.nll_loss(log_q, ref.labels[rows], ignore_index=IGNORE_INDEX, reduction="sum").item()
        agree += (log_q.argmax(-1) == ref.argmax[rows]).sum().item()
    return Sums(kl=kl, lm=lm, agree=agree, tokens=ref.sums.tokens, lm_tokens=ref.sums.lm_tokens)
