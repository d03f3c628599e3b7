"""Router load (evaluate/router.py, issue 25): the share of each MoE layer's routing every expert gets, read the
same from transformers' own class of the family and from the puzzle model, and equal to what MoEFFN routes."""

import pytest
import torch

from puzzle.evaluate.router import router_load
from puzzle.model.checkpoint import to_puzzle

from conftest import make_family_parent, make_llama


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_router_load_is_the_experts_moeffn_routes_to_in_both_classes(family):
    hf = make_family_parent(family)
    ours = to_puzzle(make_family_parent(family))
    ids = torch.randint(3, 320, (2, 16))
    chosen = {}  # layer -> (N, k) the experts MoEFFN.route picked

    def spy(layer, route):
        def wrapped(x):
            weights, picked = route(x)
            chosen[layer] = torch.cat([chosen[layer], picked]) if layer in chosen else picked
            return weights, picked
        return wrapped

    for i, layer in enumerate(ours.model.layers):
        if hasattr(layer.mlp, "route"):
            layer.mlp.route = spy(i, layer.mlp.route)
    with torch.no_grad(), router_load(hf) as theirs, router_load(ours) as mine:
        hf(ids), ours(ids)
    assert mine["router_tokens"] == theirs["router_tokens"] == ids.numel()
    assert set(mine["router_load"]) == {str(i) for i in chosen}  # MoE layers only (Qwen's dense ones left out)
    for layer, fractions in mine["router_load"].items():
        experts = ours.config.blocks[int(layer)].ffn.moe.num_experts
        counts = torch.bincount(chosen[int(layer)].flatten(), minlength=experts)
        assert fractions == pytest.approx((counts / counts.sum()).tolist())
        assert theirs["router_load"][layer] == pytest.approx(fractions)


def test_a_dense_model_has_no_router_load():
    model = to_puzzle(make_llama(num_hidden_layers=2))
    with torch.no_grad(), router_load(model) as result:
        model(torch.randint(3, 320, (1, 8)))
    assert result == {}
