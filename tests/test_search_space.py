import pytest
from transformers import LlamaConfig

from puzzle.engines import ENGINES, block_violations
from puzzle.errors import PuzzleError
from puzzle.io import read_yaml
from puzzle.model import AttentionConfig, BlockConfig, FFNConfig
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
        ({"target_engine": "tgi"}, "unknown target engine 'tgi'; choose one of transformers, vllm"),
        ({"target_engine": ["vllm"]}, "target_engine must be a name"),
        ([1, 2], "expected a mapping"),
        # non-finite and negative numbers (issue 22)
        ({"ffn": {"ratios": [float("inf")]}}, "ratios must be a list of numbers in"),
        ({"ffn": {"ratios": [float("nan")]}}, "ratios must be a list of numbers in"),
        ({"ffn": {"ratios": [-0.5]}}, "ratios must be a list of numbers in"),
        ({"ffn": {"sizes": [float("inf")]}}, "sizes must be a list of positive integers"),
        ({"ffn": {"sizes": [-64]}}, "sizes must be a list of positive integers"),
        ({"ffn": {"ratios": [0.5], "round_to": float("inf")}}, "round_to must be a positive integer"),
        ({"attention": {"kv_heads": [-3]}}, "-3 KV heads do not divide"),
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


# llama_default's FFN ratios on SmolLM2's 1536: 1536, 1336, 1152, 768, 384, 307, 154 -> the nearest multiples
# of 256 (ties to the smaller: 1152 -> 1024, 384 -> 256), deduplicated, parent first.
GRID_WIDTHS = [1536, 1280, 1024, 768, 256]
ATTENTION_VARIANTS = [AttentionConfig(n_heads_in_group=3), AttentionConfig(n_heads_in_group=9),
                      AttentionConfig(replace_with_linear=True), AttentionConfig(no_op=True)]  # llama_default's


@pytest.mark.parametrize("engine, attention, ffn_tail, first_layer", [
    # vLLM and SGLang: no no-op attention in the first layer; SGLang: the parent's KV heads only (no variable GQA)
    ("vllm", ["attn_g3", "attn_g9", "attn_noop"], ["ffn_noop"], ["attn_g3", "attn_g9"]),
    ("sglang", ["attn_g3", "attn_noop"], ["ffn_noop"], ["attn_g3"]),
    ("trtllm", ["attn_g3", "attn_g9", "attn_linear", "attn_noop"], ["ffn_linear", "ffn_noop"], None),
    ("llamacpp", ["attn_g3", "attn_g9", "attn_linear", "attn_noop"], [], None),
])
def test_a_target_engine_fits_the_space_to_its_rules(engine, attention, ffn_tail, first_layer, capsys):
    raw = {**read_yaml(SPACES_DIR / "llama_default.yaml"), "target_engine": engine}
    capsys.readouterr()
    space = build_search_space(raw, SMOLLM2)
    assert space.target_engine == engine
    assert [a.name for a in space.attention_variants(7)] == attention
    assert [a.name for a in space.attention_variants(0)] == (first_layer or attention)
    assert [f.name for f in space.ffn_variants(7)] == [f"ffn_{w}" for w in GRID_WIDTHS] + ffn_tail
    # every child the solver can assemble from the space is one the engine serves
    for layer in range(space.num_layers):
        for a in space.attention_variants(layer):
            for f in space.ffn_variants(layer):
                assert block_violations(ENGINES[engine], BlockConfig(a, f), SMOLLM2.hidden_size, first=layer == 0,
                                        kv_reference=space.parent_attention) == []
    notes = capsys.readouterr().err.splitlines()
    dropped = {a.name for a in ATTENTION_VARIANTS} - set(attention) | set(attention) - set(first_layer or attention)
    assert notes == [f"note: {n}" for n in space.notes] and len(notes) == 1 + len(dropped) + (2 - len(ffn_tail))
    assert "1152->1024" in notes[0] and engine in notes[0]


def test_the_default_target_changes_nothing(capsys):
    raw = read_yaml(SPACES_DIR / "llama_default.yaml")
    assert build_search_space({**raw, "target_engine": "transformers"}, SMOLLM2) == build_search_space(raw, SMOLLM2)
    assert capsys.readouterr().err == ""


def test_a_target_that_cannot_serve_the_parent_is_refused():
    # the tiny parent's FFN (128) is off the ffn_mult grid: vLLM would build it 256 wide
    with pytest.raises(PuzzleError, match="parent's own FFN width 128 is off the engine's ffn_mult grid"):
        build_search_space({"target_engine": "vllm"}, make_llama_config(), name="tiny")
    assert build_search_space({"target_engine": "vllm"}, make_llama_config(intermediate_size=512)).parent_ffn.intermediate_size == 512


# ---- window variants (issue 25: gpt-oss-puzzle's selective sliding-window attention) ----

def test_windows_give_each_gqa_variant_its_windowed_twins():
    space = build_search_space({"attention": {"kv_heads": "halves", "windows": [8, 32], "no_op": True}},
                               make_llama_config())
    names = [a.name for a in space.attention_variants(1)]
    assert names == ["attn_g2", "attn_g4", "attn_g2_w8", "attn_g2_w32", "attn_g4_w8", "attn_g4_w32", "attn_noop"]
    assert [v.name for v in space.variants(("attention",)) if v.is_parent] == ["attn_g2"] * 4
    assert space.variant(2, "attention", "attn_g4_w8").config == AttentionConfig(n_heads_in_group=4, window=8)


def test_a_windowed_parents_layers_keep_their_window_and_take_only_narrower_ones():
    """Qwen2's layers 2-3 are windowed (5): there the parent's variant is attn_g2_w5, every KV variant keeps
    the window, and only windows below it are new; the full-attention layers take every window."""
    from conftest import FAMILY_WINDOW, make_family_config

    space = build_search_space({"attention": {"kv_heads": "halves", "windows": [3, 8]}}, make_family_config("qwen2"))
    W = FAMILY_WINDOW
    assert [a.name for a in space.attention_variants(0)] == ["attn_g2", "attn_g4", "attn_g2_w3", "attn_g2_w8",
                                                             "attn_g4_w3", "attn_g4_w8"]
    assert [a.name for a in space.attention_variants(2)] == [f"attn_g2_w{W}", f"attn_g4_w{W}", "attn_g2_w3",
                                                             "attn_g4_w3"]
    assert [v.name for v in space.variants(("attention",)) if v.is_parent] == ["attn_g2"] * 2 + [f"attn_g2_w{W}"] * 2
    overridden = build_search_space({"attention": {"windows": [3]}, "overrides": [{"layers": [0], "attention": {}}]},
                                    make_family_config("qwen2"))
    assert [a.name for a in overridden.attention_variants(0)] == ["attn_g2"]  # an override without windows


@pytest.mark.parametrize("windows", [[0], [8, "64"], 128, [True]])
def test_bad_windows_are_one_clear_error(windows):
    with pytest.raises(PuzzleError, match="windows must be a list of positive integers"):
        build_search_space({"attention": {"windows": windows}}, make_llama_config())


def test_an_engine_without_windows_drops_the_window_variants_with_a_note(capsys):
    llama = make_llama_config(intermediate_size=512)  # on the ffn_mult grid
    space = build_search_space({"target_engine": "vllm", "attention": {"windows": [8]}}, llama)
    assert [a.name for a in space.attention_variants(1)] == ["attn_g2"]
    assert any("dropped attn_g2_w8" in n and "window_length" in n and "nemotron_nas.py" in n for n in space.notes)
# ---- MoE parents (issue 25): each layer starts from its own FFN; MoE layers take the `ffn.moe` knobs ----------

def test_moe_knobs_give_every_experts_topk_width_combination_and_dense_layers_their_widths():
    from conftest import make_family_config

    config = make_family_config("qwen2_moe")  # 6 experts of 32 top-2, a shared expert of 48; layer 3 dense 128
    raw = {"ffn": {"ratios": [1.0, 0.5], "no_op": True,
                   "moe": {"expert_ratios": [1.0, 0.5], "top_k": [2, 1, 4], "expert_width_ratios": [1.0, 0.25]}}}
    space = build_search_space(raw, config)
    assert [f.name for f in space.parent_ffns] == ["moe_e6k2_i32_s48"] * 3 + ["ffn_128"]
    names = [f.name for f in space.ffn_variants(0)]
    assert names[0] == "moe_e6k2_i32_s48" and names[-1] == "ffn_noop"
    # top-4 only where at least 4 experts are kept (6, not 3); the shared expert always the parent's
    assert set(names[:-1]) == {f"moe_e{e}k{k}_i{w}_s48" for e in (6, 3) for k in (2, 1, 4) for w in (32, 8) if k <= e}
    assert [f.name for f in space.ffn_variants(3)] == ["ffn_128", "ffn_64", "ffn_noop"]
    parents = {v.layer: v.name for v in space.variants(("ffn",)) if v.is_parent}
    assert parents == {0: "moe_e6k2_i32_s48", 1: "moe_e6k2_i32_s48", 2: "moe_e6k2_i32_s48", 3: "ffn_128"}
    with pytest.raises(ValueError, match="differs by layer"):
        space.parent_ffn  # noqa: B018


@pytest.mark.parametrize("moe, message", [
    ({"experts": [1]}, "unknown ffn.moe keys"),
    ({"expert_ratios": [0]}, "expert_ratios must be a list of numbers in"),
    ({"top_k": [0]}, "top_k must be a list of positive integers"),
    ({"expert_width_ratios": 0.5}, "expert_width_ratios must be a list"),
])
def test_bad_moe_knobs_are_one_line(moe, message):
    from conftest import make_family_config

    with pytest.raises(PuzzleError, match=message):
        build_search_space({"ffn": {"moe": moe}}, make_family_config("mixtral"))


def test_moe_engines_other_than_transformers_are_refused_for_moe_parents():
    from conftest import make_family_config

    with pytest.raises(PuzzleError, match="cannot serve mixtral children"):
        build_search_space({"target_engine": "vllm"}, make_family_config("mixtral"))
