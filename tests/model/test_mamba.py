"""The NemotronH hybrid family (issue 26): puzzle's model with every block the parent's computes transformers'
own `NemotronHForCausalLM` logits (fp32, max abs diff <= 1e-5) without a cache, step by step with one (the
Mamba2 conv and SSM states, a chunked continuation), through generate() (greedy tokens equal) and with left
padding; the weights convert from transformers' layout (fused 3-D experts) and the hub's (`backbone.`, one
tensor per expert); `puzzle convert` writes a child that reloads; the stages that do not handle a hybrid yet
refuse it in one line."""

import json

import pytest
import torch

from puzzle.errors import PuzzleError
from puzzle.model import AttentionConfig, BlockConfigError, MambaConfig
from puzzle.model.checkpoint import load_model, load_puzzle, puzzle_config_from, save_model, to_puzzle, weights_dtype
from puzzle.model.configuration_puzzle import PuzzleConfig
from puzzle.model.mamba import Mamba2Mixer, mamba_states
from puzzle.model.modeling_puzzle import GQAttention, MoEFFN, Relu2MLP
from puzzle.search_space import build_search_space, refuse_hybrid

from conftest import make_tokenizer
from hybrid import cache_of, make_nemotron_h_config, make_nemotron_h_parent

ATOL = 1e-5
SEQ = 21  # three chunks of 8, the last one padded


@pytest.fixture(scope="module")
def parent():
    return make_nemotron_h_parent()


@pytest.fixture(scope="module")
def child(parent):
    return to_puzzle(parent)


@pytest.fixture(scope="module")
def tokens():
    torch.manual_seed(1)
    return torch.randint(3, 320, (2, SEQ))


def test_conversion_puts_each_mixer_in_its_slot(child):
    config = child.config
    assert config.family == "nemotron_h"
    assert [b.name for b in config.blocks] == [
        "mamba_h8d16n16g2+ffn_noop", "attn_noop+moe_e8k2_i32_s48", "attn_g2+ffn_noop", "attn_noop+ffn_96",
        "mamba_h8d16n16g2+ffn_noop", "attn_noop+moe_e8k2_i32_s48"]
    layers = child.model.layers
    assert isinstance(layers[0].self_attn, Mamba2Mixer) and layers[0].mlp is None
    assert layers[0].input_layernorm is not None and layers[0].post_attention_layernorm is None  # one norm per layer
    assert isinstance(layers[1].mlp, MoEFFN) and layers[1].self_attn is None and layers[1].input_layernorm is None
    assert isinstance(layers[2].self_attn, GQAttention) and not layers[2].self_attn.rope  # no RoPE in NemotronH
    assert isinstance(layers[3].mlp, Relu2MLP)
    assert isinstance(layers[1].mlp.experts[0], Relu2MLP)  # non-gated relu2 experts
    assert config.num_cached_layers == 1  # only the attention layer keeps a KV cache
    again = puzzle_config_from(config)  # a child's config converts to itself
    assert again.blocks == config.blocks and again.family == "nemotron_h"
    assert (config.n_group, config.topk_group, config.routed_scaling_factor) == (4, 2, 2.5)  # carried over


def test_all_parent_child_computes_transformers_logits(parent, child, tokens):
    with torch.no_grad():
        ref, got = parent(tokens).logits, child(tokens).logits
    assert ref.abs().max() > 0.5  # not a degenerate model
    assert (got - ref).abs().max() <= ATOL


def test_cached_steps_compute_transformers_cached_logits(parent, child, tokens):
    """A 13-token prompt, a chunked continuation of 4 tokens (the states continued, not restarted), then one
    token at a time (the recurrent step): each forward's logits equal transformers' with its own cache."""
    cuts = [(0, 13), (13, 17), *((t, t + 1) for t in range(17, SEQ))]
    ref_cache = got_cache = None
    with torch.no_grad():
        for a, b in cuts:
            ref = parent(tokens[:, a:b], cache=ref_cache, use_cache=True)
            got = child(tokens[:, a:b], past_key_values=got_cache, use_cache=True)
            ref_cache, got_cache = cache_of(ref), cache_of(got)
            assert (got.logits - ref.logits).abs().max() <= ATOL, (a, b)
        full = child(tokens).logits
    assert (got.logits - full[:, -1:]).abs().max() <= ATOL  # and the cache computes the uncached logits
    conv, ssm = mamba_states(got_cache)[0]
    assert conv.shape == (2, 128 + 2 * 2 * 16, 4) and ssm.shape == (2, 8, 16, 16) and ssm.dtype == torch.float32
    assert set(mamba_states(got_cache)) == {0, 4}  # one state per Mamba2 layer, keyed by layer


def test_generate_greedy_tokens_equal_transformers(parent, child, tokens):
    with torch.no_grad():
        ref = parent.generate(tokens, max_new_tokens=8, do_sample=False)
        got = child.generate(tokens, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, ref)


def test_left_padding_is_zeroed_in_the_mamba_state_as_transformers_does(parent, child, tokens):
    mask = torch.ones_like(tokens)
    mask[0, :5] = 0  # row 0 left-padded by 5 tokens
    with torch.no_grad():
        ref = parent(tokens, attention_mask=mask).logits
        got = child(tokens, attention_mask=mask).logits
        unpadded = child(tokens[:1, 5:]).logits
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max() <= ATOL
    assert (got[0, 5:] - unpadded[0]).abs().max() <= ATOL  # the padding leaves no trace in any state


def test_sigmoid_routing_chooses_within_the_best_groups(child):
    moe = child.model.layers[1].mlp
    assert moe.sigmoid and (moe.n_group, moe.topk_group) == (4, 2) and moe.renormalise
    x = torch.randn(64, 64)
    weights, chosen = moe.route(x)
    torch.testing.assert_close(weights.sum(-1), torch.full((64,), 2.5))  # renormalised, times the scaling
    assert weights.dtype == torch.float32
    scores = moe.gate(x).sigmoid() + moe.gate.e_score_correction_bias  # (N, 8): 4 groups of 2
    group_scores = scores.view(64, 4, 2).sum(-1)  # a group of two: the sum of its two best
    best = group_scores.topk(2, dim=-1).indices
    assert bool((chosen // 2 == best[:, :1]).logical_or(chosen // 2 == best[:, 1:]).all())
    moe.gate.e_score_correction_bias.add_(torch.tensor([9.0, 9.0] + [0.0] * 6))  # the bias moves the choice ...
    try:
        w2, chosen2 = moe.route(x)
        assert bool((chosen2.sort(-1).values == torch.tensor([0, 1])).all())
        torch.testing.assert_close(w2.sum(-1), torch.full((64,), 2.5))  # ... not the weights' scale
    finally:
        moe.gate.e_score_correction_bias.sub_(torch.tensor([9.0, 9.0] + [0.0] * 6))


@pytest.fixture(scope="module")
def parent_dir(parent, tmp_path_factory):
    """The parent as transformers saves it: the hub's layout (`backbone.`, one tensor per expert)."""
    path = tmp_path_factory.mktemp("nemotron_h") / "parent"
    parent.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def test_parent_loads_from_the_hub_layout(parent, parent_dir, tokens):
    from safetensors import safe_open

    with safe_open(str(parent_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "backbone.layers.1.mixer.experts.3.up_proj.weight" in keys and "backbone.embeddings.weight" in keys
    with torch.no_grad():
        ref = parent(tokens).logits
        assert (load_puzzle(parent_dir)(tokens).logits - ref).abs().max() <= ATOL
        loaded = load_model(parent_dir)
        assert type(loaded).__name__ == "NemotronHForCausalLM"
        assert (loaded(tokens).logits - ref).abs().max() <= ATOL
    assert weights_dtype(parent_dir) == torch.float32


def test_a_hub_config_with_the_pattern_string_loads(parent, parent_dir, tokens, tmp_path):
    """The hub's config.json: `hybrid_override_pattern` (a string) and `num_hidden_layers`, checked against the
    `backbone.layers.N` tensors (puzzle.model.dimensions)."""
    import shutil

    hub = tmp_path / "hub"
    shutil.copytree(parent_dir, hub)
    config = json.loads((hub / "config.json").read_text())
    config.pop("layers_block_type")
    config.update(hybrid_override_pattern="ME*-ME", num_hidden_layers=6)
    (hub / "config.json").write_text(json.dumps(config))
    assert [b.name for b in load_puzzle(hub).config.blocks] == [b.name for b in to_puzzle(parent).config.blocks]
    with torch.no_grad():
        assert (load_puzzle(hub)(tokens).logits - parent(tokens).logits).abs().max() <= ATOL
    config["num_hidden_layers"] = 7  # a damaged count is still caught
    (hub / "config.json").write_text(json.dumps(config))
    with pytest.raises(PuzzleError, match="num_hidden_layers says 7 layers, but the file holds tensors for 6"):
        load_puzzle(hub)


def test_convert_writes_a_child_that_reloads(parent, parent_dir, tokens, tmp_path):
    from puzzle.model.convert import convert

    out = convert(parent_dir, tmp_path / "child")
    config = json.loads((out / "config.json").read_text())
    assert config["family"] == "nemotron_h" and config["block_configs"][0]["attention"]["mamba"] == {
        "num_heads": 8, "head_dim": 16, "state_dim": 16, "num_groups": 2}
    assert (out / "mamba.py").exists()  # travels with the modeling code
    with torch.no_grad():
        ref = parent(tokens).logits
        assert (load_puzzle(out)(tokens).logits - ref).abs().max() <= ATOL
        assert (load_model(out)(tokens).logits - ref).abs().max() <= ATOL


@pytest.mark.slow
def test_child_loads_with_its_own_modeling_code_elsewhere(child, tokens, tmp_path):
    from conftest import reload_elsewhere

    save_model(child, tmp_path / "child")
    with torch.no_grad():
        ref = child(tokens).logits
    out, _ = reload_elsewhere({"child": tmp_path / "child"}, tokens, tmp_path, remote_code=True)
    assert (out["child"] - ref).abs().max() <= ATOL


@pytest.mark.slow
def test_child_loads_under_the_oldest_declared_transformers(child, tokens, tmp_path):
    """transformers 4.56 has no NemotronH: the child's own modeling files (mamba.py with them) build it."""
    from conftest import reload_elsewhere
    from test_transformers_versions import OLDEST, oldest_transformers

    old = oldest_transformers()
    save_model(child, tmp_path / "child")
    with torch.no_grad():
        ref = child(tokens).logits
    out, stdout = reload_elsewhere({"child": tmp_path / "child"}, tokens, tmp_path, remote_code=True, pythonpath=str(old))
    assert f"transformers {OLDEST}" in stdout
    assert (out["child"] - ref).abs().max() <= ATOL


@pytest.mark.parametrize("name", ["mamba_h8d16n16g2", "mamba_h1d1n1g1", "mamba_h128d64n128g8"])
def test_mamba_block_names_round_trip(name):
    attention = AttentionConfig.from_name(name)
    assert attention.name == name and attention.is_mamba and not attention.is_gqa
    assert attention.num_key_value_heads(4) == 0
    assert AttentionConfig.from_dict(attention.to_dict()) == attention


@pytest.mark.parametrize("bad, message", [
    ("mamba_h8d16n16", "expected mamba_h"), ("mamba_h8d16n16g3", "does not divide"), ("mamba_h08d16n16g2", "expected"),
])
def test_bad_mamba_names_are_refused(bad, message):
    with pytest.raises(BlockConfigError, match=message):
        AttentionConfig.from_name(bad)


def test_mamba_entries_are_checked():
    with pytest.raises(BlockConfigError, match="no 'n_heads_in_group'"):
        AttentionConfig(n_heads_in_group=2, mamba=MambaConfig(8, 16, 16, 2))
    with pytest.raises(BlockConfigError, match="missing 'num_groups'"):
        AttentionConfig.from_dict({"mamba": {"num_heads": 8, "head_dim": 16, "state_dim": 16}})
    with pytest.raises(BlockConfigError, match="unsupported field 'd_conv'"):
        MambaConfig.from_dict({"num_heads": 8, "head_dim": 16, "state_dim": 16, "num_groups": 2, "d_conv": 4})
    blocks = [{"attention": AttentionConfig.from_name("mamba_h2d8n4g1").to_dict(), "ffn": {"no_op": True}}]
    with pytest.raises(BlockConfigError, match="family 'llama' is not hybrid"):
        PuzzleConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                     intermediate_size=64, vocab_size=64, block_configs=blocks)


@pytest.mark.parametrize("overrides, message", [
    ({"moe_latent_size": 16}, "latent MoE projection"),
    ({"num_nextn_predict_layers": 1}, "multi-token-prediction"),
    ({"mlp_hidden_act": "silu"}, "mlp_hidden_act='silu'"),
])
def test_unsupported_nemotron_h_parents_are_refused_in_one_line(overrides, message):
    with pytest.raises(PuzzleError, match=message):
        puzzle_config_from(make_nemotron_h_config(**overrides))


def test_stages_refuse_a_hybrid_in_one_line(child, parent_dir, tmp_path):
    for config in (make_nemotron_h_config(), child.config,
                   make_nemotron_h_config(layers_block_type=["linear_attention", "mlp"])):  # no MoE layer either
        with pytest.raises(PuzzleError, match="^importance: hybrid Mamba2 parents .* does not support them yet"):
            refuse_hybrid(config, "importance")
    from puzzle.export.commands import export
    from puzzle.pruning.commands import prune

    with pytest.raises(PuzzleError, match="^layer 3 .* llama.cpp's nemotron_h GGUF: no dense MLP layer beside MoE"):
        export(parent_dir, tmp_path / "out.gguf", format="gguf")  # GGUF holds hybrids (test_export_nemotron_h_gguf.py)
    with pytest.raises(PuzzleError, match="^export --format plain: hybrid"):
        export(parent_dir, tmp_path / "plain", format="plain")
    # prune and correct-teacher take hybrids (tests/pruning/test_pruning_hybrid.py,
    # tests/distill/test_distill_correct_hybrid.py); prune's residual-stream channels are refused before the data
    with pytest.raises(PuzzleError, match="^--hidden-size on a hybrid"):
        prune(parent=parent_dir, out=tmp_path / "pruned", run_dir=tmp_path / "run", hidden_size=16)
    assert not (tmp_path / "out.gguf").exists()


def test_search_space_of_a_hybrid_keeps_or_drops_each_layer_by_its_kind(capsys):
    """A Mamba2 layer: the parent's mixer (vLLM builds every Mamba2 layer at the global shape) or none; an
    attention layer: its KV-head variants or none; MLP and MoE layers their own variants or none; an empty slot
    stays empty. Grouped routing (4 groups here) drops the MoE variants whose experts do not split into them."""
    raw = {"target_engine": "transformers", "attention": {"kv_heads": "halves", "no_op": True},
           "ffn": {"ratios": [1.0, 0.5], "no_op": True, "moe": {"expert_ratios": [1.0, 0.5], "top_k": [2, 1]}}}
    space = build_search_space(raw, make_nemotron_h_config(), "h")
    names = [([a.name for a in att], [f.name for f in ffn]) for att, ffn in zip(space.attention, space.ffn)]
    mamba, moe = ["mamba_h8d16n16g2", "attn_noop"], ["moe_e8k2_i32_s48", "moe_e8k1_i32_s48", "ffn_noop"]
    assert names == [(mamba, ["ffn_noop"]), (["attn_noop"], moe), (["attn_g2", "attn_g4", "attn_noop"], ["ffn_noop"]),
                     (["attn_noop"], ["ffn_96", "ffn_48", "ffn_noop"]), (mamba, ["ffn_noop"]), (["attn_noop"], moe)]
    assert "dropped moe_e4k1_i32_s48, moe_e4k2_i32_s48: grouped routing" in capsys.readouterr().err
