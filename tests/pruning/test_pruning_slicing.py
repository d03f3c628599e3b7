"""The slicing helpers alone: each keeps exactly the units it names."""

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from puzzle.model import SwiGLU
from puzzle.pruning.slicing import (
    drop_layers_state,
    head_rows,
    norm_rescale,
    select_heads,
    slice_attention_state,
    slice_channels_state,
    slice_ffn_state,
    top_k,
)


def test_top_k_keeps_order_and_breaks_ties_low():
    assert top_k(torch.tensor([0.5, 2.0, 0.5, 3.0]), 3).tolist() == [0, 1, 3]


def test_head_rows():
    assert head_rows(torch.tensor([2, 0]), 3).tolist() == [6, 7, 8, 0, 1, 2]


@torch.no_grad()
def test_slice_ffn_equals_the_kept_neurons_sum():
    torch.manual_seed(0)
    mlp = SwiGLU(8, 12)
    x = torch.randn(5, 8)
    keep = torch.tensor([1, 4, 5, 11])
    small = SwiGLU(8, 4)
    state = slice_ffn_state({f"mlp.{k}": w for k, w in mlp.state_dict().items()}
                            | {"post_attention_layernorm.weight": torch.ones(8)}, keep)
    small.load_state_dict({k.removeprefix("mlp."): w for k, w in state.items() if k.startswith("mlp.")})
    act = torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
    assert torch.allclose(small(x), act[:, keep] @ mlp.down_proj.weight[:, keep].T, atol=1e-6)
    assert state["mlp.gate_proj.weight"].shape == (4, 8) and state["mlp.down_proj.weight"].shape == (8, 4)
    assert state["post_attention_layernorm.weight"].shape == (8,)


def test_select_heads_groups_then_heads():
    heads = torch.tensor([1.0, 5.0, 0.1, 0.2, 3.0, 2.0])  # 3 groups of 2 query heads
    groups, kept = select_heads(heads, n_kv_heads=3, kv_groups=2, heads_per_group=1)
    assert groups.tolist() == [0, 2] and kept.tolist() == [1, 4]
    groups, kept = select_heads(heads, 3, 3, 2)
    assert kept.tolist() == list(range(6))


def test_slice_attention_state_rows_and_columns():
    d = 2
    state = {"self_attn.q_proj.weight": torch.arange(8 * 3.0).reshape(8, 3),  # 4 heads
             "self_attn.k_proj.weight": torch.arange(4 * 3.0).reshape(4, 3),  # 2 groups
             "self_attn.v_proj.weight": torch.arange(4 * 3.0).reshape(4, 3),
             "self_attn.o_proj.weight": torch.arange(3 * 8.0).reshape(3, 8)}
    out = slice_attention_state(state, heads=torch.tensor([2, 3]), groups=torch.tensor([1]), head_dim=d)
    assert torch.equal(out["self_attn.q_proj.weight"], state["self_attn.q_proj.weight"][4:8])
    assert torch.equal(out["self_attn.k_proj.weight"], state["self_attn.k_proj.weight"][2:4])
    assert torch.equal(out["self_attn.o_proj.weight"], state["self_attn.o_proj.weight"][:, 4:8])


@torch.no_grad()
def test_channel_slicing_with_rescale_keeps_rmsnorm_exact():
    torch.manual_seed(0)
    D, keep = 10, torch.tensor([0, 2, 3, 5, 6, 9])
    x = torch.randn(4, D)
    x[:, [1, 4, 7, 8]] = 0  # the dropped channels carry nothing
    norm = LlamaRMSNorm(D, eps=1e-2)
    norm.weight[:] = torch.rand(D) + 0.5
    state = slice_channels_state({"model.norm.weight": norm.weight}, keep, D)
    small = LlamaRMSNorm(len(keep), eps=1e-2 * D / len(keep))
    small.weight[:] = state["model.norm.weight"]
    assert torch.allclose(small(x[:, keep]), norm(x)[:, keep], atol=1e-6)
    assert abs(norm_rescale(D, 6) - (10 / 6) ** 0.5) < 1e-12


def test_channel_slicing_touches_every_hidden_dim():
    D, V, F, keep = 6, 5, 4, torch.tensor([1, 3])
    state = {"model.embed_tokens.weight": torch.randn(V, D), "lm_head.weight": torch.randn(V, D),
             "model.layers.0.mlp.up_proj.weight": torch.randn(F, D), "model.layers.0.mlp.down_proj.weight":
             torch.randn(D, F), "model.layers.0.self_attn.linear_attn.weight": torch.randn(D, D),
             "model.layers.0.input_layernorm.weight": torch.ones(D)}
    out = slice_channels_state(state, keep, D, rescale_norms=False)
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    assert shapes == {"model.embed_tokens.weight": (V, 2), "lm_head.weight": (V, 2), "model.layers.0.mlp.up_proj.weight":
                      (F, 2), "model.layers.0.mlp.down_proj.weight": (2, F),
                      "model.layers.0.self_attn.linear_attn.weight": (2, 2), "model.layers.0.input_layernorm.weight": (2,)}


def test_drop_layers_state_renumbers():
    state = {f"model.layers.{i}.mlp.up_proj.weight": torch.full((1,), float(i)) for i in range(4)}
    state["model.norm.weight"] = torch.ones(1)
    out = drop_layers_state(state, [0, 3])
    assert sorted(out) == ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight", "model.norm.weight"]
    assert out["model.layers.1.mlp.up_proj.weight"].item() == 3.0
