import pytest

from puzzle.model import AttentionConfig, BlockConfig, BlockConfigError, FFNConfig, PuzzleConfig, parse_block_configs


def parent_dict(n_heads_in_group=2, size=128):
    return {
        "attention": {"n_heads_in_group": n_heads_in_group, "no_op": False, "replace_with_linear": False},
        "ffn": {"ffn_mult": None, "intermediate_size": size, "no_op": False, "replace_with_linear": False},
    }


def test_round_trip_through_json_dicts():
    blocks = [
        BlockConfig(AttentionConfig(n_heads_in_group=2), FFNConfig(intermediate_size=128)),
        BlockConfig(AttentionConfig(no_op=True), FFNConfig(replace_with_linear=True)),
        BlockConfig(AttentionConfig(replace_with_linear=True), FFNConfig(no_op=True)),
    ]
    again = [BlockConfig.from_dict(b.to_dict(64), 64) for b in blocks]
    assert again == blocks
    assert [b.name for b in blocks] == ["attn_g2+ffn_128", "attn_noop+ffn_linear", "attn_linear+ffn_noop"]


def test_ffn_mult_is_read_with_the_decilm_rule():
    # 2 * 4.0 * 576 / 3 = 1536 (already a multiple of 256); 1.3 -> 499 -> rounded up to 512
    assert FFNConfig.from_dict({"ffn_mult": 4.0}, 576).intermediate_size == 1536
    assert FFNConfig.from_dict({"ffn_mult": 1.3}, 576).intermediate_size == 512
    # when both are given, intermediate_size is authoritative
    assert FFNConfig.from_dict({"ffn_mult": 4.0, "intermediate_size": 100}, 576).intermediate_size == 100


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"attention": {"no_op": True, "replace_with_linear": True}, "ffn": {"intermediate_size": 8}}, "cannot both be true"),
        ({"attention": {"n_heads_in_group": 2}, "ffn": {"no_op": True, "replace_with_linear": True}}, "cannot both be true"),
        ({"attention": {"n_heads_in_group": 2}, "ffn": {"intermediate_size": -5}}, "must be positive"),
        ({"attention": {"n_heads_in_group": 0}, "ffn": {"intermediate_size": 8}}, "must be positive"),
        ({"attention": {"n_heads_in_group": 3}, "ffn": {"intermediate_size": 8}}, "does not divide"),
        ({"attention": {"n_heads_in_group": "two"}, "ffn": {"intermediate_size": 8}}, "must be an integer"),
        ({"attention": {"n_heads_in_group": 2}, "ffn": {}}, "needs 'intermediate_size' or 'ffn_mult'"),
        ({"attention": {"n_heads_in_group": 2}}, "needs an 'attention' and an 'ffn'"),
        ({"attention": {"n_heads_in_group": 2, "sparsify": ["x"]}, "ffn": {"intermediate_size": 8}}, "unsupported field"),
        ({"attention": {"n_heads_in_group": 2, "no_op": "yes"}, "ffn": {"intermediate_size": 8}}, "true or false"),
    ],
)
def test_malformed_entries_are_refused_with_the_layer_named(entry, message):
    with pytest.raises(BlockConfigError, match=message) as info:
        parse_block_configs([parent_dict(), entry], hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    assert "block_configs[1]" in str(info.value)


def test_block_configs_must_be_a_list_of_the_right_length():
    with pytest.raises(BlockConfigError, match="must be a list"):
        parse_block_configs({"attention": {}}, 64, 4, 1)
    with pytest.raises(BlockConfigError, match="3 entries but num_hidden_layers is 2"):
        parse_block_configs([parent_dict()] * 3, 64, 4, 2)


def test_puzzle_config_defaults_to_parent_blocks_and_validates():
    cfg = PuzzleConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    assert cfg.blocks == [BlockConfig(AttentionConfig(n_heads_in_group=2), FFNConfig(intermediate_size=128))] * 3
    assert cfg.num_cached_layers == 3
    with pytest.raises(BlockConfigError, match="does not divide"):
        PuzzleConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(BlockConfigError, match="block_configs\\[0\\]"):
        PuzzleConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                     block_configs=[{"attention": {"n_heads_in_group": 3}, "ffn": {"intermediate_size": 8}}])


def test_kv_heads_of_each_kind():
    assert AttentionConfig(n_heads_in_group=3).num_key_value_heads(9) == 3
    assert AttentionConfig(no_op=True).num_key_value_heads(9) == 0
    assert AttentionConfig(replace_with_linear=True).num_key_value_heads(9) == 0


def test_moe_blocks_round_trip_through_names_and_decilm_dicts():
    from puzzle.model import MoEConfig

    moe = FFNConfig(moe=MoEConfig(num_experts=8, top_k=2, expert_size=64))
    assert moe.name == "moe_e8k2_i64" and moe.is_moe and not moe.is_swiglu
    assert FFNConfig.from_name("moe_e8k2_i64") == moe
    block = BlockConfig(AttentionConfig(n_heads_in_group=2), moe)
    assert BlockConfig.from_name("attn_g2+moe_e8k2_i64") == block
    entry = block.to_dict(64)
    assert entry["ffn"] == {"ffn_mult": None, "intermediate_size": None, "no_op": False, "replace_with_linear": False,
                            "moe": {"num_local_experts": 8, "num_experts_per_tok": 2, "expert_intermediate_dim": 64}}
    assert BlockConfig.from_dict(entry, 64) == block
    assert "moe" not in FFNConfig(intermediate_size=128).to_dict(64)  # a dense child's config.json is unchanged
    shared = FFNConfig(moe=MoEConfig(num_experts=60, top_k=4, expert_size=1408, shared_expert_size=5632))
    assert shared.name == "moe_e60k4_i1408_s5632" and FFNConfig.from_name(shared.name) == shared
    assert shared.to_dict(64)["moe"]["shared_expert_intermediate_dim"] == 5632
    assert FFNConfig.from_dict(shared.to_dict(64), 64) == shared


@pytest.mark.parametrize("name", ["moe_e8k2", "moe_e8k2_i64_s0", "moe_e8k2_i64_s", "moe_e08k2_i64", "moe_e8k0_i64", "moe_e8k2_i64x", "moe_e2k3_i64", "moe_"])
def test_malformed_moe_names_are_refused(name):
    with pytest.raises(BlockConfigError):
        FFNConfig.from_name(name)


@pytest.mark.parametrize("moe, message", [
    ({"num_local_experts": 4, "num_experts_per_tok": 2}, "missing 'expert_intermediate_dim'"),
    ({"num_local_experts": 4, "num_experts_per_tok": 5, "expert_intermediate_dim": 8}, "exceeds the 4 experts"),
    ({"num_local_experts": 4, "num_experts_per_tok": 2, "expert_intermediate_dim": 0}, "must be positive"),
    ({"num_local_experts": 4, "num_experts_per_tok": 2, "expert_intermediate_dim": 8, "router_bias": True},
     "unsupported field"),
    ({"num_local_experts": 4, "num_experts_per_tok": 2, "expert_intermediate_dim": 8, "shared_expert_intermediate_dim": -1},
     "must be positive"),
    ("yes", "expected a mapping"),
])
def test_malformed_moe_entries_are_refused_with_the_layer_named(moe, message):
    entry = {"attention": {"n_heads_in_group": 2}, "ffn": {"moe": moe}}
    with pytest.raises(BlockConfigError, match=message) as info:
        parse_block_configs([parent_dict(), entry], hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    assert "block_configs[1]" in str(info.value)


def test_an_moe_block_has_no_dense_width():
    from puzzle.model import MoEConfig

    with pytest.raises(BlockConfigError, match="an MoE block has no"):
        FFNConfig(intermediate_size=64, moe=MoEConfig(4, 2, 8))


def test_rope_theta_reads_and_assigns_through_rope_parameters():
    """vLLM's `patch_rope_parameters` reads `config.rope_theta` and assigns it back: with transformers 5 the
    value lives in `rope_parameters`, so an assignment must land there (issue 24: the property had no setter)."""
    cfg = PuzzleConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 5e4})
    assert cfg.rope_theta == 5e4
    cfg.rope_theta = 2e5
    assert cfg.rope_theta == 2e5 and cfg.rope_parameters == {"rope_type": "default", "rope_theta": 2e5}
    assert cfg.to_dict()["rope_theta"] == 2e5
