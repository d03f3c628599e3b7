"""Distillation losses: the chunked KL / LM loss / agreement equal their one-shot forms, gradients too."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from puzzle.distill.losses import default_layer_map, forward_kl, hidden_state_loss, kd_terms, parse_layer_map


def test_forward_kl_matches_torch_and_vanishes_on_equal_logits():
    torch.manual_seed(0)
    s, t = torch.randn(6, 11), torch.randn(6, 11)
    want = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(forward_kl(s, t), want, atol=1e-6)
    assert torch.allclose(forward_kl(t, t), torch.zeros(6), atol=1e-6)
    t2 = forward_kl(s, t, temperature=2.0)
    want2 = 4 * F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(t2, want2, atol=1e-6)


def _setup(seed=0, B=3, T=7, D=8, Dt=12, V=40):
    torch.manual_seed(seed)
    s_head, t_head = nn.Linear(D, V, bias=False), nn.Linear(Dt, V, bias=False)
    s_h = torch.randn(B, T, D, requires_grad=True)
    t_h = torch.randn(B, T, Dt)
    ids = torch.randint(0, V, (B, T))
    return s_h, t_h, s_head, t_head, ids


@pytest.mark.parametrize("chunk", [1, 5, 21, 1000])
def test_chunked_terms_equal_the_one_shot_computation(chunk):
    s_h, t_h, s_head, t_head, ids = _setup()
    terms = kd_terms(s_h, t_h, s_head, t_head, ids, temperature=1.5, chunk_tokens=chunk)
    (terms.kl + terms.lm).backward()
    grad_h, grad_w = s_h.grad.clone(), s_head.weight.grad.clone()
    s_h.grad = None
    s_head.weight.grad = None

    s_logits, t_logits = s_head(s_h).reshape(-1, 40), t_head(t_h).reshape(-1, 40)
    kl = forward_kl(s_logits, t_logits, 1.5).sum()
    lm = F.cross_entropy(s_head(s_h)[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1), reduction="sum")
    (kl + lm).backward()
    assert torch.allclose(terms.kl, kl, atol=1e-4) and torch.allclose(terms.lm, lm, atol=1e-4)
    assert terms.agree.item() == (s_logits.argmax(-1) == t_logits.argmax(-1)).sum().item()
    assert (terms.tokens, terms.lm_tokens) == (21, 18)
    assert torch.allclose(grad_h, s_h.grad, atol=1e-5) and torch.allclose(grad_w, s_head.weight.grad, atol=1e-5)


def test_terms_without_labels_and_without_grad():
    s_h, t_h, s_head, t_head, _ = _setup()
    with torch.no_grad():
        terms = kd_terms(s_h, t_h, s_head, t_head, None, chunk_tokens=4)
    assert terms.lm.item() == 0 and terms.lm_tokens == 0 and terms.kl.item() > 0


def test_hidden_state_losses():
    torch.manual_seed(0)
    a = torch.randn(2, 3, 4)
    assert hidden_state_loss(a, a, "cosine").abs() < 1e-6
    assert hidden_state_loss(a, 2 * a, "cosine").abs() < 1e-6  # scale-free
    assert torch.allclose(hidden_state_loss(a, 2 * a, "mse"), a.square().mean())
    proj = nn.Linear(4, 6, bias=False)
    assert hidden_state_loss(a, torch.randn(2, 3, 6), "mse", proj) > 0
    with pytest.raises(ValueError, match="projection"):
        hidden_state_loss(a, torch.randn(2, 3, 6), "mse")


def test_layer_maps():
    assert default_layer_map(2, 4) == [(1, 2), (2, 4)]
    assert default_layer_map(3, 5, kept_layers=[0, 1, 4]) == [(1, 1), (2, 2), (3, 5)]
    assert default_layer_map(2, 4, kept_layers=[0, 1]) == [(1, 1), (2, 4)]
    assert parse_layer_map("1:2, 2:4") == [(1, 2), (2, 4)]
    with pytest.raises(ValueError, match="STUDENT:TEACHER"):
        parse_layer_map("1-2")


def test_teacher_logits_can_be_given_directly():
    s_h, t_h, s_head, t_head, ids = _setup()
    with torch.no_grad():
        a = kd_terms(s_h, t_h, s_head, t_head, ids, chunk_tokens=4)
        b = kd_terms(s_h, t_head(t_h), s_head, None, ids, chunk_tokens=4)
    assert torch.allclose(a.kl, b.kl) and torch.allclose(a.lm, b.lm) and a.agree == b.agree
