"""puzzle.metrics against an independent float64 reference (F.kl_div / F.cross_entropy over the whole
vocabulary at once): the chunked per-pair terms (values and gradients), the batched one-teacher-many-
students form, and the means every stage reports."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from puzzle.errors import PuzzleError
from puzzle.metrics import (IGNORE_INDEX, KEYS, Sums, compare, forward_kl, kd_terms, next_token_labels,
                            teacher_reference)

B, T, D, DT, V = 3, 7, 8, 12, 40


def _setup(seed=0):
    torch.manual_seed(seed)
    s_head, t_head = nn.Linear(D, V, bias=False), nn.Linear(DT, V, bias=False)
    s_h = torch.randn(B, T, D, requires_grad=True)
    t_h = torch.randn(B, T, DT)
    ids = torch.randint(0, V, (B, T))
    return s_h, t_h, s_head, t_head, ids


def reference(s_logits: torch.Tensor, t_logits: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """Sums of KL(teacher || student), next-token cross-entropy and agreement, in float64, all tokens at once."""
    s, t = s_logits.detach().double().reshape(-1, V), t_logits.detach().double().reshape(-1, V)
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    lm = F.cross_entropy(s_logits.detach().double()[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="sum")
    agree = (s.argmax(-1) == t.argmax(-1)).sum()
    return {"kl": kl.item(), "lm": lm.item(), "agree": agree.item()}


def test_next_token_labels():
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    assert next_token_labels(ids).tolist() == [6, 7, IGNORE_INDEX, 9, 10, IGNORE_INDEX]


def test_forward_kl_matches_kl_div_and_vanishes_on_equal_logits():
    torch.manual_seed(0)
    s, t = torch.randn(6, 11), torch.randn(6, 11)
    want = F.kl_div(F.log_softmax(s.double(), -1), F.log_softmax(t.double(), -1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(forward_kl(s, t).double(), want, atol=1e-6)
    assert torch.allclose(forward_kl(t, t), torch.zeros(6), atol=1e-6)
    want2 = 4 * F.kl_div(F.log_softmax(s.double() / 2, -1), F.log_softmax(t.double() / 2, -1), log_target=True,
                         reduction="none").sum(-1)
    assert torch.allclose(forward_kl(s, t, temperature=2.0).double(), want2, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 5, 21, 1000])
def test_chunked_terms_equal_the_float64_reference_gradients_too(chunk):
    s_h, t_h, s_head, t_head, ids = _setup()
    terms = kd_terms(s_h, t_h, s_head, t_head, ids, temperature=1.0, chunk_tokens=chunk)
    (terms.kl + terms.lm).backward()
    grad_h, grad_w = s_h.grad.clone(), s_head.weight.grad.clone()
    s_h.grad = None
    s_head.weight.grad = None

    want = reference(s_head(s_h), t_head(t_h), ids)
    assert terms.kl.item() == pytest.approx(want["kl"], abs=1e-4)
    assert terms.lm.item() == pytest.approx(want["lm"], abs=1e-4)
    assert terms.agree.item() == want["agree"]
    assert (terms.tokens, terms.lm_tokens) == (B * T, B * (T - 1))
    # gradients of the one-shot float32 computation
    s_logits, t_logits = s_head(s_h).reshape(-1, V), t_head(t_h).reshape(-1, V).detach()
    lm = F.cross_entropy(s_head(s_h)[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="sum")
    (forward_kl(s_logits, t_logits).sum() + lm).backward()
    assert torch.allclose(grad_h, s_h.grad, atol=1e-5) and torch.allclose(grad_w, s_head.weight.grad, atol=1e-5)


@pytest.mark.parametrize("chunk", [5, 1000])
def test_terms_without_a_teacher_are_the_lm_loss_alone(chunk):
    """Teacher correction's loss (`teacher_hidden=None`): the float64 cross-entropy and its gradient, chunked
    (each chunk recomputed in backward) or not; no KL, no agreement."""
    s_h, _, s_head, _, ids = _setup()
    terms = kd_terms(s_h, None, s_head, None, ids, chunk_tokens=chunk)
    terms.lm.backward()
    grad_h = s_h.grad.clone()
    s_h.grad = None
    lm = F.cross_entropy(s_head(s_h)[:, :-1].reshape(-1, V).double(), ids[:, 1:].reshape(-1), reduction="sum")
    assert terms.lm.item() == pytest.approx(lm.item(), abs=1e-4) and terms.lm_tokens == B * (T - 1)
    assert terms.kl.item() == 0 and terms.agree.item() == 0
    lm.backward()
    assert torch.allclose(grad_h, s_h.grad.float(), atol=1e-5)


def test_terms_without_labels_and_from_teacher_logits():
    s_h, t_h, s_head, t_head, ids = _setup()
    with torch.no_grad():
        unlabelled = kd_terms(s_h, t_h, s_head, t_head, None, chunk_tokens=4)
        a = kd_terms(s_h, t_h, s_head, t_head, ids, chunk_tokens=4)
        b = kd_terms(s_h, t_head(t_h), s_head, None, ids, chunk_tokens=4)  # the teacher's logits directly
    assert unlabelled.lm.item() == 0 and unlabelled.lm_tokens == 0 and unlabelled.kl.item() > 0
    assert torch.allclose(a.kl, b.kl) and torch.allclose(a.lm, b.lm) and a.agree == b.agree


@pytest.mark.parametrize("chunk", [1, 5, 21, 1000])
def test_batched_compare_equals_the_float64_reference_and_the_per_pair_terms(chunk):
    s_h, t_h, s_head, t_head, ids = _setup()
    with torch.no_grad():
        ref = teacher_reference(t_head, t_h.reshape(-1, DT), next_token_labels(ids), chunk)
        got = compare(ref, s_head, s_h.reshape(-1, D))
        pair = kd_terms(s_h, t_h, s_head, t_head, ids, chunk_tokens=chunk).sums()
        want = reference(s_head(s_h), t_head(t_h), ids)
    assert got.kl == pytest.approx(want["kl"], abs=1e-4) and got.lm == pytest.approx(want["lm"], abs=1e-4)
    assert got.agree == want["agree"] and (got.tokens, got.lm_tokens) == (B * T, B * (T - 1))
    for name in ("kl", "lm"):
        assert getattr(got, name) == pytest.approx(getattr(pair, name), abs=1e-4)
    assert got.agree == pair.agree
    # the teacher against itself: KL 0, agreement 1, its own LM loss
    teacher_lm = reference(t_head(t_h), t_head(t_h), ids)["lm"]
    assert ref.sums.kl == 0 and ref.sums.agree == B * T and ref.sums.lm == pytest.approx(teacher_lm, abs=1e-4)
    assert compare(ref, t_head, t_h.reshape(-1, DT)).kl == pytest.approx(0.0, abs=1e-4)


def test_means_carry_the_one_set_of_keys():
    a = Sums(kl=2.0, lm=6.0, agree=3.0, tokens=4, lm_tokens=3)
    total = a + Sums(kl=1.0, lm=3.0, agree=1.0, tokens=2, lm_tokens=1)
    m = total.means()
    assert tuple(sorted(m)) == tuple(sorted(KEYS))
    assert m == {"kl": 0.5, "lm_loss": 2.25, "perplexity": math.exp(2.25), "top1_agreement": 4 / 6, "tokens": 6}
    assert set(total.means(teacher=False)) == {"lm_loss", "perplexity", "tokens"}
    assert Sums.from_dict(total.to_dict()) == total
    with pytest.raises(PuzzleError, match="no validation tokens"):
        Sums().means()
