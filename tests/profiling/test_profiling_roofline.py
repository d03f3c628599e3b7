import pytest
import torch

from puzzle.model import AttentionConfig, BlockConfig, FFNConfig, build_attention, build_ffn
from puzzle.model.checkpoint import puzzle_config_from
from puzzle.profiling.hardware import Device, HardwareProfile, Workload
from puzzle.profiling.roofline import (
    ModelShape,
    combine_costs,
    ffn_ops,
    fixed_costs,
    kv_cache_bytes,
    op_time,
    parent_blocks,
    predict_model_costs,
    sublayer_costs,
    sublayer_ops,
)

from conftest import make_llama_config


def toy_profile(batch=2, input_len=3, output_len=4, overhead=0.0, dtype="bf16"):
    # 100 FLOP/s and 100 B/s, fully achievable: a time in seconds is max(flops, bytes) / 100
    device = Device("toy", "gpu", {dtype: 100.0}, 100.0, 1e9, 1.0, 1.0, kernel_overhead_s=overhead)
    return HardwareProfile("toy", device, Workload(batch, input_len, output_len, dtype))


def toy_shape(hidden: int, heads: int, head_dim: int, vocab: int) -> ModelShape:
    """The widths the roofline reads; the parent's KV heads, FFN width and depth do not enter a sublayer's costs."""
    return ModelShape(hidden, heads, num_key_value_heads=1, head_dim=head_dim, intermediate_size=4 * hidden,
                      num_hidden_layers=1, vocab_size=vocab)


def test_swiglu_prefill_by_hand():
    # D=4, I=8, B=2, T=3 -> n=6 tokens, bf16 (e=2 bytes)
    shape = toy_shape(4, 2, 2, 10)
    hw = toy_profile()
    ops = {op.name: op for op in ffn_ops(shape, FFNConfig(intermediate_size=8), hw.workload, "prefill")}
    # norm: 4 FLOPs per element; reads x and weight, writes y: 2*(2*6*4 + 4) bytes
    assert (ops["norm"].flops, ops["norm"].bytes) == (96, 104)
    # gate+up: (6,4)@(4,16): 2*6*4*16 FLOPs; bytes 2*(4*16 + 6*4 + 6*16)
    assert (ops["gate_up_proj"].flops, ops["gate_up_proj"].bytes) == (768, 368)
    # silu(g)*u: 5 FLOPs and 5 element reads/writes per neuron and token
    assert (ops["silu_mul"].flops, ops["silu_mul"].bytes) == (240, 480)
    # down: (6,8)@(8,4): 2*6*8*4 FLOPs; bytes 2*(8*4 + 6*8 + 6*4)
    assert (ops["down_proj"].flops, ops["down_proj"].bytes) == (384, 208)
    assert (ops["residual"].flops, ops["residual"].bytes) == (24, 144)
    # max(flops, bytes)/100 per op: 1.04 + 7.68 + 4.80 + 3.84 + 1.44
    assert sublayer_costs(shape, "ffn", FFNConfig(intermediate_size=8), hw)["prefill_s"] == pytest.approx(18.80)
    # a fixed cost per eager op: 8 (norm) + 2 + 2 + 1 + 1 kernels
    slow = toy_profile(overhead=0.01)
    assert sublayer_costs(shape, "ffn", FFNConfig(intermediate_size=8), slow)["prefill_s"] == pytest.approx(18.80 + 0.14)


def test_op_time_is_the_slower_of_compute_and_memory():
    from puzzle.profiling.roofline import Op

    device = Device("d", "gpu", {"bf16": 1000.0}, 10.0, 1.0, 0.5, 0.5, kernel_overhead_s=0.1)
    assert op_time(Op("compute-bound", flops=2000, bytes=1, kernels=1), device, "bf16") == pytest.approx(4.0 + 0.1)
    assert op_time(Op("memory-bound", flops=1, bytes=20, kernels=2), device, "bf16") == pytest.approx(4.0 + 0.2)


def test_gqa_decode_reads_the_whole_kv_cache_by_hand():
    # D=4, H=2 heads of d=2, K=1 KV head; B=1, input 4, output 4 -> decode context 4 + 2 = 6
    shape = toy_shape(4, 2, 2, 10)
    hw = toy_profile(batch=1, input_len=4, output_len=4)
    ops = {op.name: op for op in sublayer_ops(shape, "attention", AttentionConfig(n_heads_in_group=2), hw.workload, "decode")}
    core = ops["attention"]
    assert core.flops == 2 * 2 * 1 * 2 * 2 * 6  # QK^T and PV: 2 FLOPs x B x H x d x S each
    # read K and V (2 x K x d x S elements), read q and write out (2 x H x d), write the new k, v (2 x K x d)
    assert core.bytes == 2 * (2 * 1 * 2 * 6 + 2 * 2 * 2 + 2 * 1 * 2)
    # qkv: (1,4)@(4,(2+2)*2) and o: (1,4)@(4,4)
    assert ops["qkv_proj"].flops == 2 * 1 * 4 * 8
    assert ops["o_proj"].flops == 2 * 1 * 4 * 4
    # weights: q,k,v,o + the norm
    assert shape.params(AttentionConfig(n_heads_in_group=2)) == 4 * 8 + 4 * 4 + 4


def test_prefill_attention_flops_grow_quadratically_with_the_prompt():
    shape = toy_shape(64, 4, 16, 10)
    att = AttentionConfig(n_heads_in_group=2)

    def core_flops(T):
        ops = sublayer_ops(shape, "attention", att, toy_profile(batch=1, input_len=T).workload, "prefill")
        return next(op.flops for op in ops if op.name == "attention")

    assert core_flops(64) / core_flops(32) == pytest.approx(64 * 65 / (32 * 33))  # causal triangle T(T+1)/2


def test_no_op_and_linear_attention_keep_no_kv_cache():
    shape = toy_shape(64, 4, 16, 10)
    hw = toy_profile()
    noop = sublayer_costs(shape, "attention", AttentionConfig(no_op=True), hw)
    assert noop == {"params": 0, "param_bytes": 0, "kv_cache_bytes": 0, "prefill_s": 0.0, "decode_s": 0.0}
    linear = sublayer_costs(shape, "attention", AttentionConfig(replace_with_linear=True), hw)
    assert linear["kv_cache_bytes"] == 0 and linear["params"] == 64 * 64 + 64
    assert sublayer_costs(shape, "ffn", FFNConfig(no_op=True), hw)["decode_s"] == 0.0


def test_one_kv_head_of_three_holds_a_third_of_the_parents_kv_cache():
    # SmolLM2's attention: 9 query heads, 3 KV heads of 64
    shape = toy_shape(576, 9, 64, 49152)
    w = toy_profile(batch=4, input_len=100, output_len=28).workload
    parent = kv_cache_bytes(shape, AttentionConfig(n_heads_in_group=3), w)
    one_head = kv_cache_bytes(shape, AttentionConfig(n_heads_in_group=9), w)
    assert parent == 2 * 3 * 64 * 4 * 128 * 2  # 2 (K and V) x K x d x B x (in + out) x bf16 bytes
    assert one_head * 3 == parent


def test_roofline_params_match_the_built_modules():
    config = puzzle_config_from(make_llama_config())
    shape = ModelShape.from_config(config)
    variants = [
        ("attention", AttentionConfig(n_heads_in_group=2)),
        ("attention", AttentionConfig(n_heads_in_group=4)),
        ("attention", AttentionConfig(replace_with_linear=True)),
        ("ffn", FFNConfig(intermediate_size=96)),
        ("ffn", FFNConfig(replace_with_linear=True)),
    ]
    for kind, cfg in variants:
        module = build_attention(config, cfg) if kind == "attention" else build_ffn(config, cfg)
        built = sum(p.numel() for p in module.parameters()) + config.hidden_size  # + its RMSNorm
        assert shape.params(cfg) == built, cfg.name


def test_whole_model_is_fixed_plus_blocks_and_throughput_follows():
    fixed = {"embeddings": {"params": 10, "param_bytes": 20, "prefill_s": 1.0, "decode_s": 0.1}}
    rows = [
        {"params": 5, "param_bytes": 10, "kv_cache_bytes": 7, "prefill_s": 2.0, "decode_s": 0.2},
        {"params": 5, "param_bytes": 10, "kv_cache_bytes": 0, "prefill_s": 3.0, "decode_s": 0.3},
    ]
    out = combine_costs(fixed, rows, Workload(batch_size=4, input_len=8, output_len=10, dtype="bf16"))
    assert out["params"] == 20 and out["memory_bytes"] == 40 + 7
    assert out["prefill_s"] == pytest.approx(6.0) and out["decode_s"] == pytest.approx(0.6)
    assert out["generation_s"] == pytest.approx(6.0 + 10 * 0.6)
    assert out["throughput_tokens_s"] == pytest.approx(4 * 10 / 12.0)


def test_a_child_is_predicted_from_its_block_choices_alone():
    config = make_llama_config()  # 4 layers, hidden 64, 4 heads / 2 KV heads, FFN 128, vocab 320
    hw = toy_profile(batch=8, input_len=64, output_len=16)
    parent = predict_model_costs(config, parent_blocks(config), hw)
    shape = ModelShape.from_config(config)
    assert parent["params"] == sum(p.numel() for p in puzzle_child_params(config))
    lighter = [BlockConfig(AttentionConfig(no_op=True), FFNConfig(intermediate_size=64))] + parent_blocks(config)[1:]
    child = predict_model_costs(config, lighter, hw)
    assert child["throughput_tokens_s"] > parent["throughput_tokens_s"]
    assert parent["kv_cache_bytes"] - child["kv_cache_bytes"] == kv_cache_bytes(
        shape, AttentionConfig(n_heads_in_group=2), hw.workload
    )
    saved = sublayer_costs(shape, "attention", AttentionConfig(n_heads_in_group=2), hw)["decode_s"]
    saved += sublayer_costs(shape, "ffn", FFNConfig(intermediate_size=128), hw)["decode_s"]
    saved -= sublayer_costs(shape, "ffn", FFNConfig(intermediate_size=64), hw)["decode_s"]
    assert parent["decode_s"] - child["decode_s"] == pytest.approx(saved)
    # fewer layers (depth pruning) is just a shorter block list
    half = predict_model_costs(config, parent_blocks(config)[:2], hw)
    fixed = sum(v["prefill_s"] for v in fixed_costs(shape, hw).values())
    assert half["prefill_s"] - fixed == pytest.approx((parent["prefill_s"] - fixed) / 2)


def puzzle_child_params(config):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return list(LlamaForCausalLM(config).parameters())


def test_a_sliding_window_bounds_a_layers_kv_cache_and_decode_reads():
    """Mistral with and without its window: same weights and FLOPs per token, but a windowed layer caches and
    reads at most `window` tokens per sequence (the workload's context is longer than the window)."""
    from conftest import FAMILY_WINDOW, make_family_config

    profile = toy_profile(batch=2, input_len=8, output_len=8)
    assert profile.workload.max_context > FAMILY_WINDOW
    windowed = puzzle_config_from(make_family_config("mistral"))
    full = puzzle_config_from(make_family_config("mistral_nowindow"))
    w = predict_model_costs(windowed, parent_blocks(windowed), profile)
    f = predict_model_costs(full, parent_blocks(full), profile)
    assert w["params"] == f["params"]
    assert w["kv_cache_bytes"] * profile.workload.max_context == f["kv_cache_bytes"] * FAMILY_WINDOW
    assert w["decode_s"] < f["decode_s"] and w["prefill_s"] < f["prefill_s"]


def test_a_window_variant_prices_its_kv_cache_and_attention_by_its_window_at_long_context():
    """One layer's variants at a 32k context: attn_g2_w128 caches and reads B x 128 tokens (not B x 32k), its
    prefill scores only the window's pairs; its weights (and so their bytes) are attn_g2's."""
    profile = toy_profile(batch=2, input_len=16384, output_len=16384)
    w = profile.workload
    shape = toy_shape(hidden=64, heads=4, head_dim=16, vocab=320)
    full, windowed = AttentionConfig(n_heads_in_group=2), AttentionConfig(n_heads_in_group=2, window=128)
    f, c = sublayer_costs(shape, "attention", full, profile), sublayer_costs(shape, "attention", windowed, profile)
    per_token = 2 * shape.kv_heads(full) * shape.head_dim * w.dtype_bytes
    assert f["kv_cache_bytes"] == per_token * w.batch_size * w.max_context
    assert c["kv_cache_bytes"] == per_token * w.batch_size * 128
    assert c["params"] == f["params"] and c["decode_s"] < f["decode_s"] and c["prefill_s"] < f["prefill_s"]
    decode = {op.name: op for op in sublayer_ops(shape, "attention", windowed, w, "decode")}["attention"]
    assert decode.flops == w.batch_size * shape.attention_flops(full, 128)  # one query against 128 keys
    # a whole model: the windowed layer's cache is the window's, the others' the context's
    blocks = [BlockConfig(a, FFNConfig(intermediate_size=128)) for a in (full, windowed)]
    assert shape.kv_cache_bytes(blocks, w.batch_size * w.max_context, w.dtype_bytes, context=w.max_context) == (
        f["kv_cache_bytes"] + c["kv_cache_bytes"])
