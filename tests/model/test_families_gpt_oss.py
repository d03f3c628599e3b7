"""gpt-oss (issue 25) beyond the parity every MoE family has (test_families.py, test_families_moe.py): its
attention sinks against transformers' own eager attention, its router and clamped experts against transformers'
own modules, the MXFP4 dequantisation against transformers' own function, and a hub-style MXFP4 checkpoint
loaded and converted."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from puzzle.model.checkpoint import dequantize_mxfp4, load_model, load_puzzle, to_puzzle
from puzzle.model.modeling_puzzle import ClampedSwiGLU, MoEFFN, sink_attention, window_mask
from puzzle.pruning.slicing import slice_attention_state

from conftest import FAMILY_WINDOW, make_family_parent, make_tokenizer

ATOL = 1e-5


def eager_reference(q, k, v, sinks, mask):
    """transformers' gpt_oss `eager_attention_forward` on a bool mask (True = may attend): (B, H, T, d)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    module = SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], sinks=sinks, training=False)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    out, _ = eager_attention_forward(module, q, k, v, additive, scaling=q.shape[-1] ** -0.5)
    return out.transpose(1, 2)


@pytest.mark.parametrize("T, S, window", [(7, 7, None), (7, 7, 3), (1, 9, None), (1, 9, 4), (3, 9, 4)])
def test_sink_attention_is_transformers_eager_attention(T, S, window):
    """Prefill (T = S), a decode step and a chunk after a cache (T < S), with and without a window, GQA."""
    torch.manual_seed(0)
    B, H, K, d = 2, 4, 2, 8
    q, k, v = torch.randn(B, H, T, d), torch.randn(B, K, S, d), torch.randn(B, K, S, d)
    sinks = torch.randn(H)
    causal = (torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None])[None, None]  # (1, 1, T, S)
    mask = causal if window is None else window_mask(None, T, S, window, q.device)
    sinks.requires_grad_(True)
    got = sink_attention(q, k, v, sinks, None if window is None else mask)
    ref = eager_reference(q, k, v, sinks, mask.expand(B, 1, T, S))
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    probe = torch.randn(got.shape)  # the sinks train as transformers' do (BLD trains them with the attention)
    (grad,) = torch.autograd.grad((got * probe).sum(), sinks)
    (ref_grad,) = torch.autograd.grad((ref * probe).sum(), sinks)
    assert grad.abs().max() > 1e-3
    torch.testing.assert_close(grad, ref_grad, atol=ATOL, rtol=0)
    got, sinks = got.detach(), sinks.detach()
    # sinks take probability away from the keys: a sink of -inf is plain attention, a large one shrinks it
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(sink_attention(q, k, v, torch.full((H,), float("-inf")), mask), plain, atol=ATOL, rtol=0)
    assert (got - plain).abs().max() > 1e-2


def test_router_and_experts_are_transformers_own():
    """The router's top-k logits softmaxed over k (weights and experts exactly transformers'), experts with
    biases and the clamped SwiGLU whose alpha and limit come from the config (the tiny one's limit binds)."""
    parent = make_family_parent("gpt_oss")
    child = to_puzzle(parent)
    ref, moe = parent.model.layers[0].mlp, child.model.layers[0].mlp
    assert isinstance(moe, MoEFFN) and moe.routing == "topk_softmax" and moe.gate.bias is not None
    expert = moe.experts[0]
    assert isinstance(expert, ClampedSwiGLU) and (expert.alpha, expert.limit) == (1.702, 0.5)
    assert expert.gate_proj.bias is not None and expert.down_proj.bias is not None
    x = torch.randn(40, 64)
    with torch.no_grad():
        _, scores, indices = ref.router(x)
        weights, chosen = moe.route(x)
        assert torch.equal(chosen, indices)
        torch.testing.assert_close(weights, scores, atol=1e-6, rtol=0)
        assert weights.dtype == x.dtype
        assert (expert.gate_proj(x) > expert.limit).any() and (expert.up_proj(x).abs() > expert.limit).any()
        out, _ = ref(x[None])
        torch.testing.assert_close(moe(x[None]), out, atol=ATOL, rtol=0)
        # the clamp matters: the same weights under the real models' limit compute other logits
        unclamped = to_puzzle(make_family_parent("gpt_oss", swiglu_limit=7.0))
        ids = torch.randint(3, 320, (1, 12))
        assert (unclamped(ids).logits - child(ids).logits).abs().max() > 1e-3


def random_mxfp4(shape: tuple[int, ...], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 (blocks (*shape, 16) uint8, scales shape uint8) of values up to 6 * 2**-4."""
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=generator)
    scales = torch.randint(119, 124, shape, dtype=torch.uint8, generator=generator)
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_dequantisation_is_transformers_own(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks, scales = random_mxfp4((3, 10, 4), g)
    scales[0, 0, 0], scales[1, 2, 3] = 0, 255  # the exponent's extremes (2**-127 and 2**128)
    got = dequantize_mxfp4(blocks, scales, dtype)
    assert got.shape == (3, 4 * 32, 10) and got.dtype == dtype
    assert torch.equal(got, convert_moe_packed_tensors(blocks, scales, dtype=dtype))


def write_mxfp4_parent(parent, path):
    """`parent` saved as gpt-oss's hub checkpoints hold it: every layer's expert weights as MXFP4
    `*_blocks` / `*_scales` (random codes, which become the parent's weights by transformers' own
    dequantisation), biases and the rest as they are, config.json naming the quantisation."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(1)
    c = parent.config
    D, I, E = c.hidden_size, c.intermediate_size, c.num_local_experts
    packed = {}
    with torch.no_grad():
        for i, layer in enumerate(parent.model.layers):
            for name, rows, cols in (("gate_up_proj", 2 * I, D), ("down_proj", D, I)):
                blocks, scales = random_mxfp4((E, rows, cols // 32), g)
                getattr(layer.mlp.experts, name).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
                packed |= {f"model.layers.{i}.mlp.experts.{name}_blocks": blocks,
                           f"model.layers.{i}.mlp.experts.{name}_scales": scales}
    parent.save_pretrained(path, safe_serialization=True)
    make_tokenizer().save_pretrained(path)
    state = load_file(path / "model.safetensors")
    state = {k: v for k, v in state.items() if not k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    save_file(state | packed, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                     "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_an_mxfp4_checkpoint_loads_and_converts(tmp_path, capsys):
    """load_model (transformers' class), load_puzzle (ours, whole and truncated) and `puzzle convert` read
    the MXFP4 experts dequantised: transformers' logits on the dequantised weights."""
    from puzzle.cli import main

    parent = make_family_parent("gpt_oss")
    write_mxfp4_parent(parent, tmp_path / "parent")
    x = torch.randint(3, 320, (1, 3 * FAMILY_WINDOW))
    with torch.no_grad():
        ref = parent(x).logits
        assert (load_model(tmp_path / "parent")(x).logits - ref).abs().max() <= ATOL
        assert (load_puzzle(tmp_path / "parent")(x).logits - ref).abs().max() <= ATOL
        truncated = load_puzzle(tmp_path / "parent", last_layer=0)
        assert len(truncated.model.layers) == 1 and truncated.model.layers[0].mlp.experts[3].gate_proj.weight.is_contiguous()
        assert main(["convert", str(tmp_path / "parent"), str(tmp_path / "child")]) == 0, capsys.readouterr().err
        child = json.loads((tmp_path / "child" / "config.json").read_text())
        assert "quantization_config" not in child and child["family"] == "gpt_oss"
        assert (load_puzzle(tmp_path / "child")(x).logits - ref).abs().max() <= ATOL


def test_sinks_are_sliced_with_their_heads():
    state = {"model.layers.0.self_attn.sinks": torch.arange(8.0), "model.layers.0.self_attn.q_proj.bias": torch.arange(16.0)}
    out = slice_attention_state(state, heads=torch.tensor([1, 6]), groups=torch.tensor([0]), head_dim=2)
    assert out["model.layers.0.self_attn.sinks"].tolist() == [1.0, 6.0]
    assert out["model.layers.0.self_attn.q_proj.bias"].tolist() == [2.0, 3.0, 12.0, 13.0]


def test_norms_cast_last_as_gpt_oss_does():
    """GptOssRMSNorm multiplies by its weight (kept in float32 by transformers: `_keep_in_fp32_modules`) before
    the cast: in bf16 ours is bit for bit that, and one rounding away from Llama's order somewhere."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from puzzle.model.modeling_puzzle import PuzzleRMSNorm

    child = to_puzzle(make_family_parent("gpt_oss"))
    norms = [m for m in child.modules() if isinstance(m, PuzzleRMSNorm)]
    assert len(norms) == 2 * 4 + 1 and all(m.cast_last for m in norms)
    torch.manual_seed(0)
    weight = torch.randn(64).to(torch.bfloat16)
    x = torch.randn(16, 64).to(torch.bfloat16)
    ours, ref, llama = PuzzleRMSNorm(64, 1e-5, cast_last=True), GptOssRMSNorm(64, 1e-5), LlamaRMSNorm(64, 1e-5)
    with torch.no_grad():
        ours.weight.data, ref.weight.data, llama.weight.data = weight, weight.float(), weight
        assert torch.equal(ours(x), ref(x))
        assert not torch.equal(llama(x), ref(x))
