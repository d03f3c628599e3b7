"""Parity per MoE family (issue 25): puzzle's model with every block the parent's computes transformers' own
logits (fp32, max abs diff <= 1e-5), without a KV cache and step by step through generate() with one; the
parent's weights convert from transformers' layout (fused 3-D experts) and from the hub's (per-expert files,
Mixtral's block_sparse_moe names); a child with MoE blocks saves and reloads with its own modeling code."""

import json

import pytest
import torch

from puzzle.errors import PuzzleError
from puzzle.model import AttentionConfig, BlockConfig, FFNConfig, MoEConfig
from puzzle.model.checkpoint import load_model, load_puzzle, puzzle_config_from, save_model, to_puzzle
from puzzle.model.modeling_puzzle import MoEFFN, SwiGLU
from puzzle.model.surgery import replace_sublayer
from puzzle.search_space import refuse_moe

from conftest import FAMILY_WINDOW, MOE_PARENTS, make_family_config, make_family_parent, make_tokenizer, reload_elsewhere

ATOL = 1e-5
SEQ = 3 * FAMILY_WINDOW  # long enough that every window binds
# The same weights and code after a save and reload: equal but for the CPU matmul kernels' choices, which depend
# on a weight's alignment in memory (loaded tensors sit at the file's 8-byte offsets) and, in another process,
# on its thread count: measured 6e-8 in this process (0 once the loaded weights are copied to fresh, aligned
# memory: the test below checks that bit for bit) and up to 1.1e-6 in a process with the default threads.
# A routing or weight error moves logits by 1e-2 and more.
RELOAD_ATOL = ATOL


def family_name(parent: str) -> str:
    return parent.removesuffix("_norm")


@pytest.mark.parametrize("family", MOE_PARENTS)
def test_all_parent_child_computes_transformers_logits(family):
    parent = make_family_parent(family)
    child = to_puzzle(parent)
    assert child.config.family == family_name(family)
    assert any(isinstance(layer.mlp, MoEFFN) for layer in child.model.layers)
    x = torch.randint(3, 320, (2, SEQ))
    with torch.no_grad():
        ref, got = parent(x).logits, child(x).logits
    assert ref.abs().max() > 0.1  # not a degenerate model
    assert (got - ref).abs().max() <= ATOL


@pytest.mark.parametrize("family, ffns, windows", [
    # Qwen3-MoE: layer 1 in mlp_only_layers is the dense SwiGLU of intermediate_size; every layer windowed
    ("qwen3_moe", ["moe_e8k2_i32", "ffn_128", "moe_e8k2_i32", "moe_e8k2_i32"], [FAMILY_WINDOW] * 4),
    # decoder_sparse_step=2: layers 1 and 3 are MoE
    ("qwen3_moe_norm", ["ffn_128", "moe_e8k2_i32", "ffn_128", "moe_e8k2_i32"], None),
    ("mixtral", ["moe_e4k2_i128"] * 4, [FAMILY_WINDOW] * 4),
    # a shared expert of 48; layer 3 in mlp_only_layers; windows on layers 0 and 2 (Qwen2MoeConfig's layer_types)
    ("qwen2_moe", ["moe_e6k2_i32_s48"] * 3 + ["ffn_128"], [FAMILY_WINDOW, None, FAMILY_WINDOW, None]),
    # every layer MoE; GptOssConfig's alternating layer_types: sliding first
    ("gpt_oss", ["moe_e4k2_i96"] * 4, [FAMILY_WINDOW, None, FAMILY_WINDOW, None]),
])
def test_conversion_records_each_layers_ffn_and_window(family, ffns, windows):
    config = puzzle_config_from(make_family_config(family))
    assert [b.ffn.name for b in config.blocks] == ffns
    assert all(b.attention.n_heads_in_group == 2 for b in config.blocks)
    assert config.family == family_name(family)
    assert [b.attention.window for b in config.blocks] == (windows or [None] * 4)
    again = puzzle_config_from(config)  # a child's config converts to itself
    assert again.blocks == config.blocks and again.family == config.family


@pytest.mark.parametrize("family, renormalised", [  # gpt-oss: test_families_gpt_oss.py
    ("qwen3_moe", False), ("qwen3_moe_norm", True), ("mixtral", True), ("qwen2_moe", True)])
def test_top_k_weights_are_renormalised_as_the_family_says(family, renormalised):
    child = to_puzzle(make_family_parent(family))
    moe = next(layer.mlp for layer in child.model.layers if isinstance(layer.mlp, MoEFFN))
    assert moe.renormalise is renormalised
    weights, chosen = moe.route(torch.randn(32, 64))
    sums = weights.sum(-1)
    assert chosen.shape == (32, 2) and bool((chosen[:, 0] != chosen[:, 1]).all())
    if renormalised:
        torch.testing.assert_close(sums, torch.ones(32))
    else:
        assert bool((sums < 1 - 1e-3).all())  # 2 of 8 softmax probabilities


@pytest.mark.parametrize("family, dtype", [("qwen3_moe", torch.bfloat16), ("qwen2_moe", torch.bfloat16),
                                           ("mixtral", torch.float32)])
def test_top_k_weights_scale_the_experts_in_the_dtype_the_family_uses(family, dtype):
    """Qwen casts the top-k weights to the hidden states' dtype (`router_top_value.to(router_logits.dtype)`),
    Mixtral keeps them fp32: in bf16 the two differ by a rounding, so each family does as transformers does."""
    parent = make_family_parent(family).to(torch.bfloat16)
    moe = next(layer.mlp for layer in to_puzzle(parent).model.layers if isinstance(layer.mlp, MoEFFN))
    weights, _ = moe.route(torch.randn(8, 64, dtype=torch.bfloat16))
    assert weights.dtype == dtype


def test_qwen2_moe_shared_expert_and_its_gate_are_the_parents():
    parent = make_family_parent("qwen2_moe")
    ref = parent.model.layers[0].mlp
    moe = to_puzzle(parent).model.layers[0].mlp
    assert moe.shared_expert.down_proj.weight.data_ptr() == ref.shared_expert.down_proj.weight.data_ptr()
    assert moe.shared_expert_gate.weight.data_ptr() == ref.shared_expert_gate.weight.data_ptr()
    attn = to_puzzle(make_family_parent("qwen2_moe", qkv_bias=False)).model.layers[0].self_attn
    assert attn.q_proj.bias is None and attn.o_proj.bias is None  # Qwen2-MoE's own `qkv_bias` flag decides
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), ref(x), atol=ATOL, rtol=0)
        ref.shared_expert_gate.weight.zero_()  # sigmoid(0) = 1/2 of the shared expert: the gate is applied
        assert (moe(x) - ref(x)).abs().max() <= ATOL


def test_conversion_splits_fused_experts_into_views():
    parent = make_family_parent("mixtral")
    fused = parent.model.layers[0].mlp.experts
    expert = to_puzzle(parent).model.layers[0].mlp.experts[3]
    assert isinstance(expert, SwiGLU)
    assert torch.equal(expert.gate_proj.weight, fused.gate_up_proj[3, :128])
    assert torch.equal(expert.up_proj.weight, fused.gate_up_proj[3, 128:])
    assert torch.equal(expert.down_proj.weight, fused.down_proj[3])
    assert expert.gate_proj.weight.data_ptr() == fused.gate_up_proj[3].data_ptr()  # no copy


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_parents_load_from_the_hub_layout(family, tmp_path):
    """transformers 5 writes per-expert tensors (Mixtral: block_sparse_moe.experts.{j}.w1/w2/w3; gpt-oss its
    fused, interleaved experts and `mlp.router`, the hub's layout less the MXFP4 packing); both the parent
    loader (into transformers' fused class) and load_puzzle (straight into ours) read them."""
    parent = make_family_parent(family)
    parent.save_pretrained(tmp_path / "parent", safe_serialization=True)
    x = torch.randint(3, 320, (1, SEQ))
    with torch.no_grad():
        ref = parent(x).logits
        for source in (tmp_path / "parent", tmp_path / "parent" / "model.safetensors"):
            assert (load_model(source)(x).logits - ref).abs().max() <= ATOL
            assert (to_puzzle(load_model(source))(x).logits - ref).abs().max() <= ATOL
            assert (load_puzzle(source)(x).logits - ref).abs().max() <= ATOL
        truncated = load_puzzle(tmp_path / "parent", last_layer=1)
        assert len(truncated.model.layers) == 2 and truncated.lm_head is None


def heterogeneous_moe(child):
    """Layer 0 an MoE of fewer experts, top-1; layer 1 a dense FFN (an MoE layer in every family but
    qwen3_moe_norm); layer 2 a no-op FFN; layer 3 one KV head."""
    torch.manual_seed(1)
    replace_sublayer(child, 0, "ffn", FFNConfig(moe=MoEConfig(num_experts=3, top_k=1, expert_size=16)))
    replace_sublayer(child, 1, "ffn", FFNConfig(intermediate_size=48))
    replace_sublayer(child, 2, "ffn", FFNConfig(no_op=True))
    replace_sublayer(child, 3, "attention", AttentionConfig(n_heads_in_group=4))
    with torch.no_grad():  # the replaced parts' fresh weights wide enough to matter
        for p in child.model.layers[0].mlp.parameters():
            p.normal_(0.0, 0.08)
    return child.eval()


@torch.no_grad()
def test_moe_children_save_and_reload_with_remote_code_alone(tmp_path):
    x = torch.randint(3, 320, (2, SEQ))
    dirs, expected = {}, {}
    for family in MOE_PARENTS:
        child = heterogeneous_moe(to_puzzle(make_family_parent(family)))
        assert child.config.blocks[0].ffn.name == "moe_e3k1_i16"
        dirs[family] = save_model(child, tmp_path / family, make_tokenizer())
        config = json.loads((dirs[family] / "config.json").read_text())
        assert config["block_configs"][0]["ffn"]["moe"] == {
            "num_local_experts": 3, "num_experts_per_tok": 1, "expert_intermediate_dim": 16}
        expected[family] = child(x).logits
        again = load_puzzle(dirs[family])  # in this process
        assert (again(x).logits - expected[family]).abs().max() <= RELOAD_ATOL
        for p in again.parameters():
            p.data = p.data.clone()  # aligned as the in-memory child's: then bit for bit
        assert torch.equal(again(x).logits, expected[family])
        kwargs = dict(max_new_tokens=FAMILY_WINDOW + 2, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(child.generate(x[:, :4], use_cache=True, **kwargs),
                           child.generate(x[:, :4], use_cache=False, **kwargs))
    got, stdout = reload_elsewhere(dirs, x, tmp_path, remote_code=True)
    for family in MOE_PARENTS:
        assert f"{family} PuzzleForCausalLM transformers_modules" in stdout
        assert (got[family] - expected[family]).abs().max() <= RELOAD_ATOL


def test_moe_blocks_need_an_moe_family():
    from puzzle.model import BlockConfigError, PuzzleConfig

    moe = BlockConfig(AttentionConfig(n_heads_in_group=2), FFNConfig(moe=MoEConfig(4, 2, 16)))
    with pytest.raises(BlockConfigError, match="family 'llama' has none"):
        PuzzleConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                     block_configs=[moe.to_dict(64)])


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_search_stages_refuse_moe_parents_in_one_line(family):
    hf = make_family_config(family)
    for config in (hf, puzzle_config_from(hf)):
        with pytest.raises(PuzzleError, match="^score: MoE parents .* load, convert and run, but the search is not supported") as info:
            refuse_moe(config, "score")
        assert "\n" not in str(info.value)
    refuse_moe(make_family_config("qwen3"), "score")  # dense: nothing


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_convert_writes_an_all_parent_moe_child(family, tmp_path, capsys):
    from puzzle.cli import main

    parent = make_family_parent(family)
    parent.save_pretrained(tmp_path / "parent", safe_serialization=True)
    make_tokenizer().save_pretrained(tmp_path / "parent")
    assert main(["convert", str(tmp_path / "parent"), str(tmp_path / "child")]) == 0, capsys.readouterr().err
    x = torch.randint(3, 320, (1, SEQ))
    with torch.no_grad():
        assert (load_puzzle(tmp_path / "child")(x).logits - parent(x).logits).abs().max() <= ATOL


@pytest.mark.parametrize("space", ["tiny", "llama_default", "ffn_only"])
def test_dense_search_spaces_give_moe_layers_only_their_own_linear_and_noop_variants(space):
    """A space without `ffn.moe` knobs searches an MoE parent's attention and dense layers; each MoE layer
    keeps its own block (or the space's linear / no-op FFN)."""
    from puzzle.search_space import load_search_space

    for config in (make_family_config("qwen3_moe"), puzzle_config_from(make_family_config("mixtral"))):
        built = load_search_space(space, config)
        for layer, own in enumerate(built.parent_ffns):
            moe = [f for f in built.ffn_variants(layer) if f.is_moe]
            assert moe == ([own] if own.is_moe else [])


def test_moe_children_load_under_the_oldest_declared_transformers(tmp_path):
    """The MoE block's config entry, family.py's MoESpec and MoEFFN work under transformers 4.56 too (remote
    code, no puzzle): the same logits as here."""
    from test_transformers_versions import OLDEST, oldest_transformers

    old = oldest_transformers()
    x = torch.randint(3, 320, (2, SEQ))
    dirs, expected = {}, {}
    for family in MOE_PARENTS:
        child = heterogeneous_moe(to_puzzle(make_family_parent(family)))
        dirs[family] = save_model(child, tmp_path / family, make_tokenizer())
        with torch.no_grad():
            expected[family] = child(x).logits
    got, stdout = reload_elsewhere(dirs, x, tmp_path, remote_code=True, pythonpath=str(old))
    assert f"transformers {OLDEST}." in stdout
    for family in MOE_PARENTS:
        assert f"{family} PuzzleForCausalLM transformers_modules" in stdout
        assert (got[family] - expected[family]).abs().max() <= RELOAD_ATOL
