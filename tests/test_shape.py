"""ModelShape's arithmetic against independent references: the parameters of real transformers /
puzzle models, the KV cache a model builds, the FLOPs torch's counter sees, the tensors a forward writes."""

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache

from puzzle.model import AttentionConfig, BlockConfig, FFNConfig, PuzzleConfig, PuzzleForCausalLM
from puzzle.model.checkpoint import puzzle_config_from
from puzzle.shape import FIXED_PARTS, ModelShape

from conftest import make_llama, make_llama_config

# Every kind of block the child format has, one per layer of a 4-layer parent (4 query / 2 KV heads, FFN 128).
MIXED = [
    BlockConfig(AttentionConfig(no_op=True), FFNConfig(intermediate_size=128)),
    BlockConfig(AttentionConfig(n_heads_in_group=2), FFNConfig(replace_with_linear=True)),
    BlockConfig(AttentionConfig(n_heads_in_group=4), FFNConfig(no_op=True)),
    BlockConfig(AttentionConfig(replace_with_linear=True), FFNConfig(intermediate_size=48)),
]


def mixed_model(tied: bool = False, **overrides) -> PuzzleForCausalLM:
    config = puzzle_config_from(make_llama_config(tie_word_embeddings=tied, **overrides))
    data = {**config.to_dict(), "block_configs": [b.to_dict(config.hidden_size) for b in MIXED]}
    data.pop("model_type", None)
    torch.manual_seed(0)
    return PuzzleForCausalLM(PuzzleConfig(**data)).eval()


def numel(module: nn.Module | None, ndim: int | None = None) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if ndim is None or p.ndim == ndim)


@pytest.mark.parametrize("tied", [False, True])
def test_parameters_of_a_transformers_llama(tied):
    model = make_llama(tie_word_embeddings=tied)
    shape = ModelShape.from_config(model.config)
    assert shape.total_params() == numel(model)
    assert shape.total_params() - shape.non_embedding_params() == numel(model.model.embed_tokens) + (
        0 if tied else numel(model.lm_head)
    )


@pytest.mark.parametrize("tied", [False, True])
def test_parameters_of_a_child_with_every_block_kind(tied):
    model = mixed_model(tied)
    shape = ModelShape.from_config(model.config)
    assert shape.total_params(MIXED) == numel(model)
    assert shape.fixed_params("embeddings") == numel(model.model.embed_tokens)
    assert shape.fixed_params("final_norm") == numel(model.model.norm)
    for layer, block in zip(model.model.layers, MIXED):
        assert shape.params(block.attention) == numel(layer.self_attn) + numel(layer.input_layernorm), block.name
        assert shape.params(block.ffn) == numel(layer.mlp) + numel(layer.post_attention_layernorm), block.name
        assert shape.params(block) == numel(layer), block.name
        assert shape.matmul_params(block) == numel(layer, ndim=2), block.name


def test_head_dim_other_than_hidden_over_heads_is_counted():
    model = mixed_model(head_dim=8)  # 4 heads of 8 in a 64-wide model
    shape = ModelShape.from_config(model.config)
    assert shape.head_dim == 8
    assert shape.total_params(MIXED) == numel(model)


def test_kv_cache_bytes_equal_the_cache_the_model_builds():
    model = mixed_model()
    shape = ModelShape.from_config(model.config)
    batch, seq = 3, 7
    cache = DynamicCache()
    with torch.no_grad():
        model(torch.randint(0, 320, (batch, seq)), past_key_values=cache, use_cache=True)
    built = sum(
        t.numel() * t.element_size() for layer in cache.layers if layer.get_seq_length() > 0 for t in (layer.keys, layer.values)
    )
    dtype_bytes = next(model.parameters()).element_size()
    assert built > 0
    assert shape.kv_cache_bytes(MIXED, batch * seq, dtype_bytes) == built
    per_layer = [shape.kv_cache_bytes_per_token(b, dtype_bytes) for b in MIXED]
    assert [n > 0 for n in per_layer] == [b.attention.is_gqa for b in MIXED]


def test_decode_flops_equal_what_torch_counts():
    """One new token over a cache of `context - 1`: matmuls 2 x weights, attention 4*H*d*context, the LM head."""
    model = mixed_model()
    shape = ModelShape.from_config(model.config)
    batch, context = 2, 9
    cache = DynamicCache()
    with torch.no_grad():
        model(torch.randint(0, 320, (batch, context - 1)), past_key_values=cache, use_cache=True)
        counter = FlopCounterMode(display=False)
        with counter, sdpa_kernel(SDPBackend.MATH):  # attention as plain matmuls, which torch counts
            model(torch.randint(0, 320, (batch, 1)), past_key_values=cache, use_cache=True)
    predicted = sum(shape.flops_per_token(b, context) for b in MIXED)
    predicted += sum(shape.fixed_flops_per_token(part) for part in FIXED_PARTS)
    assert counter.get_total_flops() == batch * predicted


def test_prefill_matmul_flops_equal_what_torch_counts():
    """A prompt's weight matmuls and LM head; torch counts attention over the full square, so compare it
    to 4*H*d*T per query (non-causal) and check the causal count is the lower triangle of that."""
    model = mixed_model()
    shape = ModelShape.from_config(model.config)
    batch, seq = 2, 6
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, sdpa_kernel(SDPBackend.MATH):
        model(torch.randint(0, 320, (batch, seq)), use_cache=False, logits_to_keep=0)
    full_square = sum(2 * shape.matmul_params(b) * seq + seq * shape.attention_flops(b, seq) for b in MIXED)
    assert counter.get_total_flops() == batch * (full_square + seq * shape.fixed_flops_per_token("lm_head"))
    for b in MIXED:
        causal = shape.prefill_flops(b, seq) - 2 * shape.matmul_params(b) * seq
        assert causal == sum(shape.attention_flops(b, t) for t in range(1, seq + 1))


def test_activation_bytes_equal_the_tensors_a_forward_writes():
    """Each sublayer's norm, projections, attention output and gated product, seen through module hooks."""
    model = mixed_model()
    shape = ModelShape.from_config(model.config)
    written = {i: 0 for i in range(len(MIXED))}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) or "layernorm" in name:
                def count(mod, args, out, i=i, name=name):
                    written[i] += out.numel() * out.element_size()
                    if name.endswith(("o_proj", "down_proj")):  # attention output / silu(gate) * up
                        written[i] += args[0].numel() * args[0].element_size()
                hooks.append(module.register_forward_hook(count))
    batch, seq = 2, 5
    with torch.no_grad():
        model(torch.randint(0, 320, (batch, seq)), use_cache=False)
    for h in hooks:
        h.remove()
    e = next(model.parameters()).element_size()
    assert [written[i] for i in range(len(MIXED))] == [batch * seq * shape.activation_bytes_per_token(b, e) for b in MIXED]


def test_parent_block_and_with_():
    config = make_llama_config()
    shape = ModelShape.from_config(config)
    assert shape.parent_block.name == f"attn_g{config.num_attention_heads // config.num_key_value_heads}+ffn_{config.intermediate_size}"
    assert shape.total_params() == shape.total_params([shape.parent_block] * config.num_hidden_layers)
    shallower = shape.with_(num_hidden_layers=config.num_hidden_layers - 1)
    assert shape.total_params() - shallower.total_params() == shape.params(shape.parent_block)
    with pytest.raises(ValueError, match="unknown fixed part"):
        shape.fixed_params("head")


def test_model_bytes_and_adamw_bytes_equal_what_torch_holds():
    """Weights in memory, and AdamW's gradient + two moments after one step (torch's own tensors)."""
    model = mixed_model()
    shape = ModelShape.from_config(model.config)
    e = next(model.parameters()).element_size()
    blocks = model.config.blocks
    assert shape.model_bytes(blocks, e) == sum(p.numel() * p.element_size() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 320, (2, 5)), labels=torch.randint(0, 320, (2, 5))).loss.backward()
    optimizer.step()
    held = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    held += sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items() if k != "step")
    assert shape.adamw_bytes(shape.total_params(blocks), e) == held


def test_model_flops_per_token_equal_what_torch_counts_for_a_decode_step():
    """One decode step (a token after a cached prompt) through every layer and the LM head."""
    model = mixed_model()
    shape = ModelShape.from_config(model.config)
    prompt, cache = torch.randint(0, 320, (1, 4)), DynamicCache()
    with torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
        counter = FlopCounterMode(display=False)
        with counter, sdpa_kernel(SDPBackend.MATH):
            model(torch.randint(0, 320, (1, 1)), past_key_values=cache, use_cache=True)
    assert counter.get_total_flops() == shape.model_flops_per_token(model.config.blocks, keys=5)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gpt_oss"])
def test_parameters_of_each_familys_transformers_model(family):
    """q/k/v and o biases, q/k norms, sinks and explicit head_dim counted as transformers' own classes hold them."""
    from conftest import make_family_parent

    from puzzle.model.checkpoint import to_puzzle

    model = make_family_parent(family)
    shape = ModelShape.from_config(model.config)
    assert shape.total_params() == numel(model)
    assert ModelShape.from_config(to_puzzle(model).config) == shape  # the child's config gives the same shape
    attention = shape.parent_attention
    assert shape.params(attention) == numel(model.model.layers[0].self_attn) + numel(model.model.layers[0].input_layernorm)


def test_a_sliding_window_bounds_attention_keys_and_kv_cache():
    """Attention FLOPs count exactly the (query, key) pairs transformers' sliding-window mask allows; the
    cache of a windowed layer holds at most the window per sequence. The window is the variant's own: the
    parent's windowed layers carry it on their blocks."""
    from conftest import FAMILY_WINDOW, make_family_config
    from transformers.masking_utils import causal_mask_function, sliding_window_overlay

    shape = ModelShape.from_config(make_family_config("qwen2"))  # layers 2 and 3 windowed
    assert shape.sliding_windows == (None, None, FAMILY_WINDOW, FAMILY_WINDOW)
    W, T, att = FAMILY_WINDOW, 3 * FAMILY_WINDOW, shape.parent_attention
    assert [shape.window(b) for b in shape.parent_blocks] == [None, None, W, W]
    windowed = shape.parent_blocks[2].attention
    assert windowed == att.with_window(W) and windowed.name == f"{att.name}_w{W}"
    per_pair = 4 * shape.num_attention_heads * shape.head_dim
    window = sliding_window_overlay(W)
    pairs = sum(bool(causal_mask_function(0, 0, q, k)) and bool(window(0, 0, q, k)) for q in range(T) for k in range(T))
    assert shape.causal_attention_flops(windowed, T) == per_pair * pairs
    assert shape.causal_attention_flops(att, T) == per_pair * T * (T + 1) // 2
    assert shape.causal_attention_flops(windowed, W - 1) == shape.causal_attention_flops(att, W - 1)
    assert shape.attention_flops(windowed, 100) == per_pair * W
    assert shape.attention_flops(shape.parent_blocks[3], 100) == per_pair * W  # a block: its attention's window
    batch, e = 2, 4
    full = shape.kv_cache_bytes_per_token(att, e)
    assert shape.kv_cache_bytes(None, batch * T, e, context=T) == full * batch * (2 * T + 2 * W)
    assert shape.kv_cache_bytes(None, batch * T, e) == full * batch * T * 4  # no context: no window applied


# ---- MoE parents (issue 25): total and active parameters, FLOPs of the experts a token goes through ----

@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_moe_norm", "mixtral", "qwen2_moe", "gpt_oss"])
def test_parameters_of_moe_parents_total_and_active(family):
    from conftest import make_family_parent

    from puzzle.model.checkpoint import to_puzzle

    parent = make_family_parent(family)
    shape = ModelShape.from_config(parent.config)
    assert shape.total_params() == numel(parent)  # transformers' fused 3-D experts counted whole
    child = to_puzzle(parent)
    assert ModelShape.from_config(child.config) == shape  # the converted child has the same parent blocks
    assert shape.total_params(child.config.blocks) == numel(child)
    assert [b.ffn.name for b in shape.parent_blocks] == [b.ffn.name for b in child.config.blocks]
    for layer, block in zip(child.model.layers, shape.parent_blocks):
        norm = numel(layer.post_attention_layernorm)
        assert shape.params(block.ffn) == numel(layer.mlp) + norm, block.name
        if block.ffn.is_moe:  # a token uses the router and top_k of the experts
            active = numel(layer.mlp.gate) + block.ffn.moe.top_k * numel(layer.mlp.experts[0])
            active += numel(layer.mlp.shared_expert) + numel(layer.mlp.shared_expert_gate)  # every token's
            assert shape.active_params(block.ffn) == active + norm < shape.params(block.ffn)
            # gpt-oss's router and expert biases are no matmul's
            biases = sum(p.numel() for n, p in layer.mlp.gate.named_parameters() if n == "bias")
            biases += block.ffn.moe.top_k * sum(p.numel() for n, p in layer.mlp.experts[0].named_parameters()
                                                if n.endswith("bias"))
            assert shape.matmul_params(block.ffn) == active - biases
        else:
            assert shape.active_params(block.ffn) == shape.params(block.ffn)
    assert shape.active_layer_params() == sum(shape.active_params(b) for b in shape.parent_blocks) < shape.layer_params()


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe", "gpt_oss"])
def test_moe_prefill_flops_are_those_of_the_active_experts_torch_counts(family):
    """Every token runs exactly top_k experts and the router: torch's count of the MoE FFN's matmuls on a
    prompt is `prefill_flops`, whichever experts the tokens chose."""
    from conftest import make_family_parent

    from puzzle.model.checkpoint import to_puzzle

    child = to_puzzle(make_family_parent(family))
    shape = ModelShape.from_config(child.config)
    layer = next(i for i, b in enumerate(shape.parent_blocks) if b.ffn.is_moe)
    ffn = shape.parent_blocks[layer].ffn
    batch, seq = 2, 9
    x = torch.randn(batch, seq, shape.hidden_size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        child.model.layers[layer].mlp(x)
    assert counter.get_total_flops() == batch * shape.prefill_flops(ffn, seq)
    assert shape.flops_per_token(ffn, 100) == 2 * shape.matmul_params(ffn)


@pytest.mark.parametrize("layers, experts, total, active", [(36, 128, 116.83, 5.13), (24, 32, 20.91, 3.61)])
def test_gpt_oss_parameters_are_the_model_cards(layers, experts, total, active):
    """OpenAI's gpt-oss model card (arXiv 2508.10925, table 1): gpt-oss-120b 116.83B parameters, 5.13B active per
    token, gpt-oss-20b 20.91B and 3.61B (active: the unembedding counted, the embedding not). The expert biases
    (0.04B in the 120b) move the second decimal."""
    from transformers import GptOssConfig

    shape = ModelShape.from_config(GptOssConfig(num_hidden_layers=layers, num_local_experts=experts))
    assert round(shape.total_params() / 1e9, 2) == total
    assert round((shape.total_params(shape.parent_blocks) - shape.layer_params() + shape.active_layer_params()
                  - shape.fixed_params("embeddings")) / 1e9, 2) == active


def test_moe_parent_shapes_round_trip_through_json_and_name_their_per_layer_ffns():
    import json

    from conftest import make_family_config

    shape = ModelShape.from_config(make_family_config("qwen3_moe"))
    assert shape.parent_ffns == ("moe_e8k2_i32", "ffn_128", "moe_e8k2_i32", "moe_e8k2_i32")
    with pytest.raises(ValueError, match="differs by layer"):
        shape.parent_ffn  # noqa: B018  (Qwen3-MoE's dense mlp_only_layers: no one parent FFN)
    assert ModelShape(**json.loads(json.dumps(shape.__dict__))) == shape
    mixtral = ModelShape.from_config(make_family_config("mixtral"))
    assert mixtral.parent_ffn.name == "moe_e4k2_i128" and mixtral.parent_block.ffn == mixtral.parent_ffn
    assert ModelShape.from_config(make_llama_config()).parent_ffns is None  # dense: as before
