import pytest
from transformers import LlamaConfig

from puzzle.errors import PuzzleError
from puzzle.model import AttentionConfig, FFNConfig
from puzzle.search_space import SPACES_DIR, build_search_space, load_search_space

from conftest import make_llama_config

SMOLLM2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152)


@pytest.mark.parametrize("name", sorted(p.stem for p in SPACES_DIR.glob("*.yaml")))
def test_every_shipped_space_resolves_for_both_parents_and_starts_with_the_parent(name):
    for config in (make_llama_config(), SMOLLM2):
        space = load_search_space(name, config)
        assert space.num_layers == config.num_hidden_layers
        for layer in range(space.num_layers):
            assert space.attention_variants(layer)[0] == space.parent_attention
            assert space.ffn_variants(layer)[0] == space.parent_ffn
        parents = [v for v in space.variants() if v.is_parent]
        assert len(parents) == 2 * space.num_layers


def test_llama_default_on_smollm2_is_the_papers_space():
    space = load_search_space("llama_default", SMOLLM2)
    # 3 KV heads halved down to 1 (1.5 is not a head count): group sizes 3 and 9; then linear, no-op
    assert [a.name for a in space.attention_variants(7)] == ["attn_g3", "attn_g9", "attn_linear", "attn_noop"]
    sizes = [f.intermediate_size for f in space.ffn_variants(7) if f.is_swiglu]
    assert sizes == [1536, 1336, 1152, 768, 384, 307, 154]
    assert space.ffn_variants(7)[-2:] == [FFNConfig(replace_with_linear=True), FFNConfig(no_op=True)]
    assert len(space) == 30 * (4 + 9)


def test_overrides_keep_first_and_last_layers_whole():
    space = load_search_space("smollm2_quick", SMOLLM2)
    for layer in (0, 29):
        assert space.attention_variants(layer) == [AttentionConfig(n_heads_in_group=3)]
        assert space.ffn_variants(layer) == [FFNConfig(intermediate_size=1536)]
    assert len(space.attention_variants(1)) == 4
    assert space.variant(3, "ffn", "ffn_768").config == FFNConfig(intermediate_size=768)
    with pytest.raises(PuzzleError, match="no ffn variant 'ffn_999'"):
        space.variant(3, "ffn", "ffn_999")


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"attention": {"kv_heads": [2]}}, "2 KV heads do not divide the parent's 9 query heads"),
        ({"attention": {"kv_heads": "most"}}, "kv_heads must be"),
        ({"attention": {"heads": 3}}, "unknown attention keys"),
        ({"ffn": {"ratios": [1.5]}}, "ratios must be a list of numbers in"),
        ({"ffn": {"ratios": [0.5], "sizes": [100]}}, "either 'ratios' or 'sizes'"),
        ({"ffn": {"linear": "yes"}}, "must be true or false"),
        ({"overrides": [{"layers": [30], "ffn": {}}]}, "outside the parent's 30 layers"),
        ({"overrides": [{"ffn": {}}]}, "needs 'layers'"),
        ({"search": {}}, "unknown keys"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_bad_spaces_are_one_clear_error(raw, message):
    with pytest.raises(PuzzleError, match=message):
        build_search_space(raw, SMOLLM2, name="bad")


def test_unknown_name_lists_the_shipped_spaces(tmp_path):
    with pytest.raises(PuzzleError, match="shipped: .*llama_default"):
        load_search_space("nope", SMOLLM2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("attention: [unclosed\n")
    with pytest.raises(PuzzleError, match="not valid YAML"):
        load_search_space(bad, SMOLLM2)
