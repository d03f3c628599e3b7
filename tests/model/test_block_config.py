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


def test_rope_theta_reads_and_assigns_through_rope_parameters():
    """vLLM's `patch_rope_parameters` reads `config.rope_theta` and assigns it back: with transformers 5 the
    value lives in `rope_parameters`, so an assignment must land there (issue 24: the property had no setter)."""
    cfg = PuzzleConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 5e4})
    assert cfg.rope_theta == 5e4
    cfg.rope_theta = 2e5
    assert cfg.rope_theta == 2e5 and cfg.rope_parameters == {"rope_type": "default", "rope_theta": 2e5}
    assert cfg.to_dict()["rope_theta"] == 2e5
