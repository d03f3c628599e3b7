"""Minitron pruning of every parent family: dead units go without changing transformers' own outputs (biases
cut with their heads and channels, q/k norms kept), and the pruned checkpoint is the family's plain class,
which transformers loads with no custom code, windows and all."""

import pytest
import torch

from puzzle.model.checkpoint import to_puzzle
from puzzle.model.family import FAMILIES
from puzzle.pruning.importance import compute_importance
from puzzle.pruning.prune import PrunePlan, prune_model, save_pruned

from conftest import FAMILY_PARENTS, make_family_parent, make_tokenizer, reload_elsewhere

IDS = torch.randint(3, 320, (8, 16), generator=torch.Generator().manual_seed(0))
DEAD_NEURONS = torch.arange(0, 128, 4)  # 32 of 128
DEAD_CHANNELS = torch.tensor([3, 17, 40, 63])


def family_name(parent: str) -> str:
    return parent.removesuffix("_nowindow")


@torch.no_grad()
def plant_dead_units(model):
    """Zero 32 FFN neurons, 4 residual channels and, per layer, one KV group's values (bias included)."""
    d = model.model.layers[0].self_attn.head_dim
    model.model.embed_tokens.weight[:, DEAD_CHANNELS] = 0
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        mlp.gate_proj.weight[DEAD_NEURONS] = 0
        g = i % 2
        attn.v_proj.weight[g * d : (g + 1) * d] = 0
        if attn.v_proj.bias is not None:
            attn.v_proj.bias[g * d : (g + 1) * d] = 0
        for residual_out in (attn.o_proj, mlp.down_proj):
            residual_out.weight[DEAD_CHANNELS] = 0
            if residual_out.bias is not None:
                residual_out.bias[DEAD_CHANNELS] = 0
    return model


@pytest.mark.parametrize("family", FAMILY_PARENTS)
@torch.no_grad()
def test_pruning_dead_units_keeps_the_parents_outputs(family):
    model = plant_dead_units(make_family_parent(family))
    parent = to_puzzle(model)
    scores = compute_importance(parent, [IDS[:4], IDS[4:]], progress=False)
    pruned, record = prune_model(parent, scores, PrunePlan(hidden_size=60, intermediate_size=96, kv_groups=1))
    assert type(pruned).__name__ == FAMILIES[family_name(family)].causal_lm_class
    c = pruned.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (60, 96, 2, 1)
    assert not set(record["channels"]) & set(DEAD_CHANNELS.tolist())
    assert (pruned(IDS).logits - model(IDS).logits).abs().max() <= 1e-4


@torch.no_grad()
@pytest.mark.slow
def test_pruned_checkpoints_load_in_plain_transformers_without_custom_code(tmp_path):
    tokenizer = make_tokenizer()
    dirs, expected = {}, {}
    for family in FAMILY_PARENTS:
        parent = to_puzzle(make_family_parent(family))
        scores = compute_importance(parent, [IDS], progress=False, block_sizes=())
        pruned, record = prune_model(parent, scores, PrunePlan(intermediate_size=64, heads_per_group=1, drop_layers=(1,)))
        dirs[family] = save_pruned(pruned, tmp_path / family, tokenizer, record)
        expected[family] = pruned(IDS).logits
        assert not list(dirs[family].glob("*.py"))  # nothing for trust_remote_code to run
        windows = FAMILIES[family_name(family)].layer_windows(pruned.config)
        assert windows == [parent.config.layer_window(i) for i in (0, 2, 3)]  # layer 1 dropped, windows kept
    got, stdout = reload_elsewhere(dirs, IDS, tmp_path, remote_code=False)
    for family in FAMILY_PARENTS:
        assert f"{family} {FAMILIES[family_name(family)].causal_lm_class} transformers.models." in stdout
        assert torch.equal(got[family], expected[family])
