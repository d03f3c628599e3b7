"""Window variants (issue 25, gpt-oss-puzzle's selective sliding-window attention): a GQA attention block with
`window` W attends to keys in (t - W, t]. A windowed variant of a full-attention parent layer, with the parent's
weights unchanged, computes what transformers' own sliding-window attention computes, with and without a KV
cache; older children whose windows lived in a config-level `sliding_windows` list load with the windows on
their blocks."""

import json

import pytest
import torch

from puzzle.errors import PuzzleError
from puzzle.model import AttentionConfig, BlockConfig, FFNConfig, PuzzleConfig
from puzzle.model.blocks import BlockConfigError
from puzzle.model.checkpoint import load_puzzle, save_model, to_puzzle
from puzzle.model.surgery import replace_sublayer, sublayer_state

from conftest import FAMILY_WINDOW, make_family_parent, make_llama_config, make_tokenizer

ATOL = 1e-5
W = FAMILY_WINDOW
SEQ = 3 * W  # every window binds


def windowed(child, layers, window=W):
    """`child` with the attention of `layers` replaced by its own windowed variant, weights unchanged (as the
    library's init copies them)."""
    for i in layers:
        attention = child.config.blocks[i].attention
        replace_sublayer(child, i, "attention", attention.with_window(window), sublayer_state(child, i, "attention"))
    return child.eval()


def generate(model, prompt):
    kwargs = dict(max_new_tokens=2 * W, do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
                  return_dict_in_generate=True)
    return (model.generate(prompt, use_cache=True, **kwargs), model.generate(prompt, use_cache=False, **kwargs))


# transformers' own sliding-window models with the full-attention parent's weights (same seed, same shapes):
# Mistral windows every layer (MistralModel: create_sliding_window_causal_mask), Qwen2 the layers from
# max_window_layers on (Qwen2Config's layer_types: layers 2 and 3)
@pytest.mark.parametrize("family, nowindow, layers", [
    ("mistral", {"sliding_window": None}, [0, 1, 2, 3]),
    ("qwen2", {"use_sliding_window": False}, [2, 3]),
])
@torch.no_grad()
def test_window_variants_compute_transformers_sliding_window_attention(family, nowindow, layers):
    reference = make_family_parent(family)  # transformers' sliding-window attention
    child = to_puzzle(make_family_parent(family, **nowindow))
    assert all(b.attention.window is None for b in child.config.blocks)
    x = torch.randint(3, 320, (2, SEQ))
    full = child(x).logits
    windowed(child, layers)
    assert [b.attention.name for b in child.config.blocks] == [f"attn_g2_w{W}" if i in layers else "attn_g2"
                                                               for i in range(4)]
    ref, got = reference(x).logits, child(x).logits
    assert (got - ref).abs().max() <= ATOL
    assert (got[:, W:] - full[:, W:]).abs().max() > 1e-3  # the window binds: not the full-attention parent
    (ref_cached, _), (cached, uncached) = generate(reference, x[:, :W + 2]), generate(child, x[:, :W + 2])
    assert torch.equal(cached.sequences, ref_cached.sequences) and torch.equal(uncached.sequences, ref_cached.sequences)
    for r, c, u in zip(ref_cached.logits, cached.logits, uncached.logits):
        assert (c - r).abs().max() <= ATOL and (u - r).abs().max() <= ATOL


def test_window_names_and_block_configs_entries_round_trip():
    attention = AttentionConfig.from_name("attn_g3_w128")
    assert attention == AttentionConfig(n_heads_in_group=3, window=128) and attention.name == "attn_g3_w128"
    entry = attention.to_dict()
    assert entry["window_length"] == 128 and AttentionConfig.from_dict(entry) == attention
    assert "window_length" not in AttentionConfig(n_heads_in_group=3).to_dict()  # unwindowed: as before
    assert AttentionConfig.from_dict({"no_op": True, "window_length": 64}) == AttentionConfig(no_op=True)  # DeciLM clears it
    assert BlockConfig.from_name("attn_g1_w8+ffn_64").attention.window == 8
    assert AttentionConfig(replace_with_linear=True).with_window(8) == AttentionConfig(replace_with_linear=True)
    for bad in ("attn_g3_w0", "attn_g3_w", "attn_w8", "attn_linear_w8", "attn_g3_w08"):
        with pytest.raises(BlockConfigError):
            AttentionConfig.from_name(bad)
    with pytest.raises(BlockConfigError, match="only a GQA block"):
        AttentionConfig(no_op=True, window=8)


@torch.no_grad()
def test_an_older_child_with_config_level_sliding_windows_loads_with_them_on_its_blocks(tmp_path):
    """Children saved before the window joined the block wrote `sliding_windows` beside `block_configs`: the
    parent's windows (from its family) become the parent's own attention blocks' windows."""
    new = to_puzzle(make_family_parent("qwen2"))  # layers 2 and 3 windowed
    path = save_model(new, tmp_path / "child", make_tokenizer())
    data = json.loads((path / "config.json").read_text())
    assert "sliding_windows" not in data
    assert [b["attention"].get("window_length") for b in data["block_configs"]] == [None, None, W, W]
    for b in data["block_configs"]:  # the older layout: the windows at config level only
        b["attention"].pop("window_length", None)
    data["sliding_windows"] = [None, None, W, W]
    (path / "config.json").write_text(json.dumps(data))
    old = load_puzzle(path)
    assert old.config.blocks == new.config.blocks and "sliding_windows" not in old.config.to_dict()
    x = torch.randint(3, 320, (1, SEQ))
    assert torch.equal(old(x).logits, new(x).logits)
    data["block_configs"][2]["attention"]["window_length"] = W + 1  # two windows for one layer
    with pytest.raises(BlockConfigError, match="sliding_windows"):
        PuzzleConfig(**{k: v for k, v in data.items() if k not in ("model_type", "auto_map", "architectures")})


def test_a_childs_windows_are_its_blocks_for_every_reader():
    """layer_window, family.config_family (what the shape and the engines read) and the engines' rules all
    read a child's windows off its blocks; vLLM, whose nemotron-nas loader ignores window_length, refuses it."""
    from puzzle.engines import check_child, check_family
    from puzzle.model.family import config_family
    from puzzle.shape import ModelShape

    llama = {k: v for k, v in make_llama_config().to_dict().items() if k not in ("model_type", "architectures")}
    config = PuzzleConfig(**llama, block_configs=[
        BlockConfig(AttentionConfig(n_heads_in_group=2, window=W if i == 1 else None), FFNConfig(intermediate_size=256))
        .to_dict(None) for i in range(4)])
    assert [config.layer_window(i) for i in range(4)] == config_family(config)[1] == [None, W, None, None]
    assert ModelShape.from_config(config).sliding_windows == (None, W, None, None)
    check_child("transformers", config.blocks, config.hidden_size)
    with pytest.raises(PuzzleError, match=rf"layer 1 \(attn_g2_w{W}\+ffn_256\): no sliding-window attention"):
        check_child("vllm", config.blocks, config.hidden_size)
    with pytest.raises(PuzzleError, match="llama children with sliding-window layers.*DeciLMDecoderLayer"):
        check_family("vllm", config)
