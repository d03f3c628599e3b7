"""Distillation losses beyond KL / LM loss (those are tests/test_metrics.py): hidden-state losses, layer maps."""

import pytest
import torch
from torch import nn

from puzzle.distill.losses import default_layer_map, hidden_state_loss, parse_layer_map


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
