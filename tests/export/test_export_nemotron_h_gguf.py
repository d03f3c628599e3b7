"""`puzzle export --format gguf` of a hybrid (NemotronH) child (issue 26): llama.cpp's nemotron_h /
nemotron_h_moe GGUF, run by llama.cpp itself (llama-cpp-python 0.3.36), gives puzzle's logits and greedy tokens
for a child whose KV heads, MLP widths, expert widths and top-k differ per layer, with a dropped Mamba2 layer
and a layer holding two mixers; what llama.cpp cannot hold is refused in one line naming its rule."""


import gguf
import numpy as np
import pytest
import torch

from puzzle.cli import main
from puzzle.errors import PuzzleError
from puzzle.export.commands import export
from puzzle.export.nemotron_h_gguf import check_nemotron_h_gguf
from puzzle.model import AttentionConfig, FFNConfig, MoEConfig
from puzzle.model.checkpoint import save_model, to_puzzle
from puzzle.model.surgery import replace_sublayer

from conftest import make_tokenizer
from hybrid import make_nemotron_h_parent

from llamacpp_engine import llama_cpp, needs_llamacpp

# Max abs logit difference allowed between llama.cpp (f32 GGUF, f32 KV cache) and puzzle: measured 2e-6 (dense)
# and 1.6e-6 (MoE) on these children, logits of magnitude ~2.6
TOL = 1e-4
TOKENS = [5, 17, 300, 42, 7, 99, 123, 250, 8, 64, 11, 3, 260, 1, 77, 18, 201, 45, 9, 10, 33]  # 21: three Mamba2 chunks
DENSE = ["linear_attention", "full_attention", "mlp", "linear_attention", "mlp", "full_attention"]
MOE = ["linear_attention", "moe", "full_attention", "linear_attention", "moe"]


def _randomize(layer: torch.nn.Module, seed: int) -> None:
    """A replaced sublayer's fresh weights, as large as the parent's (tests/hybrid.py): matrices N(0, 0.08),
    norms N(1, 0.2)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.normal_(0.0, 0.08) if p.ndim >= 2 else p.normal_(1.0, 0.2) if "norm" in name else None


def dense_child():
    """KV heads 2 -> 1 (layer 1), MLP 96 -> 40 (layer 2), the Mamba2 layer 3 dropped (left out of the GGUF),
    attention added before layer 4's MLP (two GGUF blocks)."""
    child = to_puzzle(make_nemotron_h_parent(seed=7, layers_block_type=DENSE))
    replace_sublayer(child, 1, "attention", AttentionConfig(n_heads_in_group=4))
    replace_sublayer(child, 2, "ffn", FFNConfig(intermediate_size=40))
    replace_sublayer(child, 3, "attention", AttentionConfig(no_op=True))
    replace_sublayer(child, 4, "attention", AttentionConfig(n_heads_in_group=2))
    for i in (1, 2, 4):
        _randomize(child.model.layers[i], seed=i)
    return child.eval()


def moe_child():
    """Layer 1: top-1 of 8 experts of 24 (the parent: top-2 of 32); layer 2: 1 KV head."""
    child = to_puzzle(make_nemotron_h_parent(seed=8, layers_block_type=MOE))
    replace_sublayer(child, 1, "ffn", FFNConfig(moe=MoEConfig(8, 1, 24, 48)))
    replace_sublayer(child, 2, "attention", AttentionConfig(n_heads_in_group=4))
    for i in (1, 2):
        _randomize(child.model.layers[i], seed=i)
    with torch.no_grad():
        child.model.layers[1].mlp.gate.weight.normal_(0.0, 0.3)  # a router that separates the experts
    return child.eval()


def open_llamacpp(path):
    return llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, logits_all=True, vocab_only=False, verbose=False,
                           type_k=gguf.GGMLQuantizationType.F32, type_v=gguf.GGMLQuantizationType.F32)


def greedy(child, tokens: list[int], n: int) -> list[int]:
    """puzzle's greedy continuation, a full forward per token (no cache: an independent path)."""
    out = list(tokens)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(child(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(tokens):]


def exported(child, tmp_path, dtype="f32"):
    path = save_model(child, tmp_path / "child", make_tokenizer())
    return export(path, tmp_path / "child.gguf", format="gguf", dtype=dtype)


def fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}


@pytest.mark.slow
@needs_llamacpp
@pytest.mark.parametrize("make, arch", [(dense_child, "nemotron_h"), (moe_child, "nemotron_h_moe")])
def test_llamacpp_runs_a_heterogeneous_hybrid_with_puzzles_logits_and_greedy_tokens(make, arch, tmp_path):
    child = make()
    path = exported(child, tmp_path)
    kv = fields(path)
    assert kv["general.architecture"] == arch
    if arch == "nemotron_h":  # blocks: M * - * - *  (layer 3 left out, layer 4 split in two)
        assert kv["nemotron_h.block_count"] == 6
        assert kv["nemotron_h.attention.head_count_kv"] == [0, 1, 0, 2, 0, 2]
        assert kv["nemotron_h.feed_forward_length"] == [0, 0, 40, 0, 96, 0]
    else:
        assert kv["nemotron_h_moe.expert_used_count"] == [0, 1, 0, 0, 2]
        assert kv["nemotron_h_moe.expert_feed_forward_length"] == [0, 24, 0, 0, 32]
        assert kv["nemotron_h_moe.attention.head_count_kv"] == [0, 0, 1, 0, 0]
        assert kv["nemotron_h_moe.expert_count"] == 8 and kv["nemotron_h_moe.expert_group_used_count"] == 2
    llm = open_llamacpp(path)
    try:
        llm.eval(TOKENS)
        got = np.array(llm.scores[: len(TOKENS)])
        with torch.no_grad():
            want = child(torch.tensor([TOKENS])).logits[0].numpy()
        assert np.abs(want).max() > 1  # the comparison would be empty on a degenerate model
        assert np.abs(got - want).max() <= TOL
        llm.reset()
        tokens = []
        for t in llm.generate(TOKENS[:9], top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            tokens.append(t)
            if len(tokens) == 8:
                break
    finally:
        llm.close()
    assert tokens == greedy(child, TOKENS[:9], 8)


@needs_llamacpp
@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_f16_and_q8_0_load_in_llamacpp_within_rounding(dtype, tmp_path):
    """f16 and q8_0 (rows of 16 or 40 values fall back to f16; ssm_conv1d, ssm_a, ssm_d and norms stay f32)
    move llama.cpp's logits much less than they differ between tokens (the deci export's criterion,
    test_export_llamacpp.py). The dense child: an MoE router's top-k may flip under rounding."""
    child = dense_child()
    path = exported(child, tmp_path, dtype)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    f32 = gguf.GGMLQuantizationType.F32
    assert types["blk.0.ssm_a"] == types["blk.0.ssm_d"] == types["blk.0.ssm_conv1d.weight"] == f32
    assert types["blk.0.ssm_norm.weight"] == f32 and types["blk.0.ssm_in.weight"] != f32
    llm = open_llamacpp(path)
    try:
        llm.eval(TOKENS)
        got = np.array(llm.scores[: len(TOKENS)])
    finally:
        llm.close()
    with torch.no_grad():
        want = child(torch.tensor([TOKENS])).logits[0].numpy()
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() < np.abs(want - want.mean(axis=1, keepdims=True)).max() / 10


def test_the_router_stays_f32_at_q8_0(tmp_path):
    """ffn_gate_inp (the router) and exp_probs_b stay f32 at q8_0, as llama.cpp's converter keeps them."""
    path = exported(moe_child(), tmp_path, "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.1.ffn_gate_inp.weight"] == types["blk.1.exp_probs_b.bias"] == gguf.GGMLQuantizationType.F32
    assert types["blk.1.ffn_up_exps.weight"] == gguf.GGMLQuantizationType.Q8_0  # rows of 64: whole blocks


def test_mlp_beside_moe_is_refused_through_the_cli_in_one_line(tmp_path, capsys):
    """The default tiny parent has MLP and MoE layers: with expert_count > 0 llama.cpp loads every FFN block
    as MoE, so the export is refused (exit 2, one line naming the rule and llama.cpp's code), nothing written."""
    path = save_model(to_puzzle(make_nemotron_h_parent()), tmp_path / "child", make_tokenizer())
    capsys.readouterr()
    assert main(["export", str(path), str(tmp_path / "x.gguf"), "--format", "gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("puzzle: error: layer 3 (attn_noop+ffn_96) cannot be exported to llama.cpp's nemotron_h")
    assert "no dense MLP layer beside MoE layers" in err and "nemotron-h.cpp" in err
    assert "\n" not in err and not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("layer, kind, config, message", [
    (4, "ffn", FFNConfig(moe=MoEConfig(16, 2, 32, 48)), "layer 4 .* the same number of experts .*llama-model.cpp"),
    (4, "ffn", FFNConfig(moe=MoEConfig(8, 2, 32, 16)), "layer 4 .* a shared expert of one width"),
    (3, "attention", AttentionConfig.from_name("mamba_h4d16n16g2"), "layer 3 .* one shape .*load_arch_hparams"),
    (2, "attention", AttentionConfig(replace_with_linear=True), "layer 2 .* no linear"),
])
def test_what_llamacpp_cannot_hold_is_refused_in_one_line(layer, kind, config, message):
    """Per-layer expert counts and shared-expert widths (scalars in the GGUF), a second Mamba2 shape, linear
    sublayers: refused naming the first layer that breaks a `nemotron_h_*` rule (puzzle.engines)."""
    child = to_puzzle(make_nemotron_h_parent(layers_block_type=MOE))
    replace_sublayer(child, layer, kind, config)  # a later layer differs from the first of its kind
    with pytest.raises(PuzzleError, match=message) as err:
        check_nemotron_h_gguf(child.config)
    assert "\n" not in str(err.value)
