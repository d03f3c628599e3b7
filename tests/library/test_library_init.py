"""Pruned initialisation: each rule computes what it claims, checked against the real sublayer modules."""

import pytest
import torch
from conftest import make_llama

from puzzle.library.init import (
    FFNCalibration,
    channel_contribution,
    init_attention,
    init_ffn,
    linear_attention_weight,
    linear_ffn_weight,
    mean_pool_kv_heads,
    ridge_solve,
    top_channels,
)
from puzzle.errors import PuzzleError
from puzzle.library.bld import Sublayer
from puzzle.model.checkpoint import to_puzzle
from puzzle.model.blocks import AttentionConfig, FFNConfig
from puzzle.model.surgery import sublayer_state


@pytest.fixture
def parent():
    # 8 query heads, 4 KV heads, so pooling to 2 and 1 and copying to 8 are all possible
    return to_puzzle(make_llama(num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=4, hidden_size=64))


def rope(parent, x):
    B, T, _ = x.shape
    return parent.model.rotary_emb(x, torch.arange(T)[None].expand(B, T))


def test_kv_pooling_is_exact_when_the_pooled_heads_agree(parent):
    """Pooling K/V over heads that are equal changes nothing; otherwise each new head is their mean."""
    state = sublayer_state(parent, 0, "attention")
    d = parent.config.head_dim
    for name in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
        w = state[name].view(4, d, -1)
        w[1], w[3] = w[0], w[2]  # heads {0,1} and {2,3} become pairs of equal heads
    attn = AttentionConfig(n_heads_in_group=4)  # 2 KV heads
    child_state, method = init_attention(state, attn, num_heads=8, num_kv_heads=4)
    assert method == "kv_mean_pool"
    x = torch.randn(2, 7, 64)
    pe = rope(parent, x)
    full = Sublayer(parent.config, "attention", AttentionConfig(n_heads_in_group=2), state)
    pooled = Sublayer(parent.config, "attention", attn, child_state)
    torch.testing.assert_close(pooled(x, pe), full(x, pe), rtol=1e-5, atol=1e-6)

    k = state["self_attn.k_proj.weight"].view(4, d, -1)
    one = mean_pool_kv_heads(state["self_attn.k_proj.weight"], 8, 4, 1)
    torch.testing.assert_close(one, k.mean(0))
    eight = mean_pool_kv_heads(state["self_attn.k_proj.weight"], 8, 4, 8).view(8, d, -1)
    torch.testing.assert_close(eight, k.repeat_interleave(2, dim=0))  # more heads: copies, same function


def test_linear_attention_is_attention_where_each_token_sees_only_itself(parent):
    """With one token (so it attends only to itself) GQA equals the W_o W_v linear map."""
    state = sublayer_state(parent, 0, "attention")
    child_state, method = init_attention(state, AttentionConfig(replace_with_linear=True), 8, 4)
    assert method == "wo_wv"
    w = linear_attention_weight(state["self_attn.v_proj.weight"], state["self_attn.o_proj.weight"], 8, 4)
    torch.testing.assert_close(child_state["self_attn.linear_attn.weight"], w)
    x = torch.randn(5, 1, 64)  # 5 sequences of a single token
    gqa = Sublayer(parent.config, "attention", AttentionConfig(n_heads_in_group=2), state)
    linear = Sublayer(parent.config, "attention", AttentionConfig(replace_with_linear=True), child_state)
    torch.testing.assert_close(linear(x, rope(parent, x)), gqa(x, rope(parent, x)), rtol=1e-5, atol=1e-6)


def calibrate(state, x):
    gate, up = state["mlp.gate_proj.weight"], state["mlp.up_proj.weight"]
    inner = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
    return FFNCalibration(inner.abs().sum(0), x.shape[0], x, inner @ state["mlp.down_proj.weight"].T)


def test_channel_contribution_keeps_the_neurons_that_matter(parent):
    state = sublayer_state(parent, 0, "ffn")
    state["mlp.down_proj.weight"][:, :100] *= 1e-3  # neurons 0..99 barely reach the output
    x = torch.randn(256, 64)
    calib = calibrate(state, x)
    scores = channel_contribution(calib.abs_activation_sum / calib.tokens, state["mlp.down_proj.weight"])
    assert scores[:100].max() < scores[100:].min()
    child, method = init_ffn(state, FFNConfig(intermediate_size=28), calib)
    assert method == "channel_contribution"
    keep = top_channels(scores, 28)
    assert keep.tolist() == list(range(100, 128))
    torch.testing.assert_close(child["mlp.down_proj.weight"], state["mlp.down_proj.weight"][:, 100:])
    torch.testing.assert_close(child["mlp.gate_proj.weight"], state["mlp.gate_proj.weight"][100:])
    # the pruned FFN (minus 100 near-silent neurons) computes almost what the parent does
    full = Sublayer(parent.config, "ffn", FFNConfig(intermediate_size=128), state)
    pruned = Sublayer(parent.config, "ffn", FFNConfig(intermediate_size=28), child)
    y, y_pruned = full(x[None], None) - x, pruned(x[None], None) - x  # what each adds to the residual stream
    assert (y - y_pruned).pow(2).mean() < 1e-3 * y.pow(2).mean()


def test_minitron_scores_choose_the_neurons_when_given(parent):
    state = sublayer_state(parent, 0, "ffn")
    scores = torch.zeros(128)
    scores[[5, 60, 7, 99]] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    child, method = init_ffn(state, FFNConfig(intermediate_size=3), None, neuron_scores=scores)
    assert method == "minitron"
    torch.testing.assert_close(child["mlp.up_proj.weight"], state["mlp.up_proj.weight"][[5, 7, 60]])
    with pytest.raises(ValueError, match="shape"):
        init_ffn(state, FFNConfig(intermediate_size=3), None, neuron_scores=torch.ones(5))


def test_linear_ffn_is_the_least_squares_fit(parent):
    state = sublayer_state(parent, 0, "ffn")
    torch.manual_seed(1)
    x = torch.randn(512, 64)
    w_true = torch.randn(64, 64)
    torch.testing.assert_close(linear_ffn_weight(x, x @ w_true.T), w_true, rtol=1e-4, atol=1e-4)
    calib = calibrate(state, x)
    child, method = init_ffn(state, FFNConfig(replace_with_linear=True), calib)
    assert method == "lstsq"
    w = child["mlp.linear_mlp.weight"]
    residual = x @ w.T - calib.y
    # optimality: the residual is orthogonal to every input direction (normal equations)
    assert (x.T @ residual).abs().max() < 1e-3 * (x.T @ calib.y).abs().max()


def test_parent_sized_variants_are_copies_and_noops_are_empty(parent):
    att = sublayer_state(parent, 0, "attention")
    ffn = sublayer_state(parent, 0, "ffn")
    same, method = init_attention(att, AttentionConfig(n_heads_in_group=2), 8, 4)
    assert method == "copy" and all(torch.equal(same[k], att[k]) for k in att)
    same, method = init_ffn(ffn, FFNConfig(intermediate_size=128), None)
    assert method == "copy" and all(torch.equal(same[k], ffn[k]) for k in ffn)
    assert init_attention(att, AttentionConfig(no_op=True), 8, 4) == ({}, "noop")
    assert init_ffn(ffn, FFNConfig(no_op=True), None) == ({}, "noop")
    with pytest.raises(ValueError, match="cannot be pruned"):
        init_ffn(ffn, FFNConfig(intermediate_size=256), None)


def test_cholesky_ridge_fit_is_lstsq_to_float_rounding_on_a_well_posed_problem():
    torch.manual_seed(2)
    x = torch.randn(300, 48, dtype=torch.float64) * torch.linspace(0.2, 3.0, 48, dtype=torch.float64)  # cond(X) ~ 30
    y = torch.randn(300, 48, dtype=torch.float64)
    reference = torch.linalg.lstsq(x, y, driver="gelsd").solution.T
    w = linear_ffn_weight(x, y)
    assert w.dtype == torch.float64
    torch.testing.assert_close(w, reference, rtol=1e-6, atol=1e-7)
    # in float32 (what BLD stores) the two agree to float32 rounding
    torch.testing.assert_close(linear_ffn_weight(x.float(), y.float()), reference.float(), rtol=1e-4, atol=1e-5)
    xtx, xty = x.T @ x, x.T @ y
    torch.testing.assert_close(ridge_solve(xtx, xty).T, reference, rtol=1e-6, atol=1e-7)


def test_fewer_calibration_tokens_than_channels_is_well_posed_with_the_ridge(parent):
    state = sublayer_state(parent, 0, "ffn")
    torch.manual_seed(1)
    x = torch.randn(20, 64)  # 20 tokens < hidden 64: X^T X has rank 20
    calib = calibrate(state, x)
    child, method = init_ffn(state, FFNConfig(replace_with_linear=True), calib)
    w = child["mlp.linear_mlp.weight"]
    assert method == "lstsq" and w.shape == (64, 64) and torch.isfinite(w).all()
    # the fit still explains the calibration tokens (it interpolates them up to the ridge), and it is the
    # near-minimum-norm one gelsd returns: nothing in the 44 directions the tokens do not span
    assert (x @ w.T - calib.y).norm() < 1e-3 * calib.y.norm()
    min_norm = torch.linalg.lstsq(x.double(), calib.y.double(), driver="gelsd").solution.T
    torch.testing.assert_close(w.double(), min_norm, rtol=1e-3, atol=1e-4)


def test_a_non_finite_calibration_fails_in_one_line():
    x = torch.randn(32, 8)
    x[3, 2] = float("nan")
    with pytest.raises(PuzzleError, match="not positive definite"):
        linear_ffn_weight(x, torch.randn(32, 8))


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gpt_oss"])
def test_attention_init_carries_the_familys_biases_and_qk_norms(family):
    """Copy keeps every part of the family's attention; pooling to one KV head pools k/v biases like their
    weights, keeps q's bias, the (head_dim,) q/k norms and gpt-oss's per-query-head sinks, and fits the
    module the child builds."""
    from conftest import make_family_parent

    from puzzle.model.checkpoint import to_puzzle
    from puzzle.model.surgery import replace_sublayer, sublayer_state

    parent = to_puzzle(make_family_parent(family))
    state = sublayer_state(parent, 2, "attention")
    copy, method = init_attention(state, AttentionConfig(n_heads_in_group=2), 4, 2)
    assert method == "copy" and copy.keys() == state.keys() and all(torch.equal(copy[k], state[k]) for k in state)
    pooled, method = init_attention(state, AttentionConfig(n_heads_in_group=4), 4, 2)
    assert method == "kv_mean_pool"
    d = parent.model.layers[2].self_attn.head_dim
    for name in ("k_proj", "v_proj"):
        weight = state[f"self_attn.{name}.weight"]
        torch.testing.assert_close(pooled[f"self_attn.{name}.weight"], weight.view(2, d, -1).mean(0))
        if f"self_attn.{name}.bias" in state:
            torch.testing.assert_close(pooled[f"self_attn.{name}.bias"], state[f"self_attn.{name}.bias"].view(2, d).mean(0))
    assert ("self_attn.sinks" in state) == (family == "gpt_oss")
    for key in [k for k in state if "q_proj" in k or "norm" in k or "sinks" in k]:
        assert torch.equal(pooled[key], state[key])
    replace_sublayer(parent, 2, "attention", AttentionConfig(n_heads_in_group=4), pooled)  # strict load: fits


# ---- MoE FFN (issue 25) ------------------------------------------------------------------------------------

@pytest.fixture(params=["qwen3_moe", "mixtral", "qwen2_moe"])
def moe_parent(request):
    from conftest import make_family_parent

    model = to_puzzle(make_family_parent(request.param))
    layer = next(i for i, b in enumerate(model.config.blocks) if b.ffn.is_moe)
    return model, layer


def _moe_out(model, layer, variant, state, x):
    return Sublayer(model.config, "ffn", variant, state)(x, None)


def test_all_experts_kept_at_the_parents_topk_reproduce_the_parent_exactly(moe_parent):
    from puzzle.library.init import init_moe_ffn

    model, layer = moe_parent
    own = model.config.blocks[layer].ffn
    parent_state = sublayer_state(model, layer, "ffn")
    state, method, keep = init_moe_ffn(parent_state, own.moe, own.moe)
    assert method == "copy" and keep == list(range(own.moe.num_experts))
    x = torch.randn(2, 7, model.config.hidden_size)
    with torch.no_grad():
        expected = model.model.layers[layer].ffn_residual(x)
        assert torch.equal(_moe_out(model, layer, own, state, x), expected)


def test_kept_experts_and_their_router_rows_are_the_chosen_parent_ones(moe_parent):
    """Every token routed to a kept expert in the child computes that parent expert's output: the child's
    router logits are the parent's kept columns, each expert the parent's (narrowed by Channel Contribution)."""
    from puzzle.library.init import choose_experts, init_moe_ffn
    from puzzle.model.blocks import MoEConfig

    model, layer = moe_parent
    own = model.config.blocks[layer].ffn.moe
    parent_state = sublayer_state(model, layer, "ffn")
    child = MoEConfig(own.num_experts // 2, 1, own.expert_size // 2, own.shared_expert_size)
    # by router row norm by default; by the given scores (moe importance's selection frequency) when given
    norms = parent_state["mlp.gate.weight"].norm(dim=1)
    assert choose_experts(parent_state, child.num_experts) == sorted(norms.topk(child.num_experts).indices.tolist())
    scores = torch.arange(own.num_experts, dtype=torch.float)  # the last experts score highest
    activations = torch.rand(own.num_experts, own.expert_size)
    calib = FFNCalibration(activations, 1, torch.zeros(0), torch.zeros(0))
    state, method, keep = init_moe_ffn(parent_state, own, child, expert_scores=scores, calibration=calib)
    assert keep == list(range(own.num_experts - child.num_experts, own.num_experts))
    assert method == "experts_by_importance+channel_contribution"
    assert torch.equal(state["mlp.gate.weight"], parent_state["mlp.gate.weight"][keep])
    for new, old in enumerate(keep):
        down = parent_state[f"mlp.experts.{old}.down_proj.weight"]
        neurons = top_channels(channel_contribution(activations[old], down), child.expert_size)
        assert torch.equal(state[f"mlp.experts.{new}.down_proj.weight"], down[:, neurons])
        assert torch.equal(state[f"mlp.experts.{new}.gate_proj.weight"],
                           parent_state[f"mlp.experts.{old}.gate_proj.weight"][neurons])
    shared = {k for k in parent_state if "shared_expert" in k}
    assert all(torch.equal(state[k], parent_state[k]) for k in shared)
    assert len(state) == 2 + 3 * child.num_experts + len(shared)  # norm, router, experts, shared expert
    with pytest.raises(ValueError, match="distinct"):
        init_moe_ffn(parent_state, own, child, keep=[0] * child.num_experts, calibration=calib)
