"""Parity per parent family: puzzle's model with every block the parent's computes transformers' own logits
(fp32, max abs diff <= 1e-5), without a KV cache and step by step through generate() with one."""

import pytest
import torch

from puzzle.model import AttentionConfig, FFNConfig, PuzzleForCausalLM
from puzzle.model.checkpoint import puzzle_config_from, save_model, to_puzzle
from puzzle.model.family import FAMILIES
from puzzle.model.surgery import replace_sublayer, sublayer_state

from conftest import (FAMILY_PARENTS, FAMILY_WINDOW, MOE_PARENTS, make_family_config, make_family_parent, make_tokenizer,
                      reload_elsewhere)

ATOL = 1e-5
SEQ = 3 * FAMILY_WINDOW  # long enough that every window binds


def windows_of(config) -> list[int | None]:
    """Each layer's sliding window: its attention block's."""
    return [b.attention.window for b in config.blocks]


@pytest.mark.parametrize("family", FAMILY_PARENTS)
def test_all_parent_child_computes_transformers_logits(family):
    parent = make_family_parent(family)
    child = to_puzzle(parent)
    assert child.config.family == family.removesuffix("_nowindow")
    x = torch.randint(3, 320, (2, SEQ))
    with torch.no_grad():
        ref, got = parent(x).logits, child(x).logits
    assert ref.abs().max() > 0.1  # not a degenerate model
    assert (got - ref).abs().max() <= ATOL


# MoE ones: the Mixture-of-Experts families too, gpt-oss's sinks and clamped experts among them
@pytest.mark.parametrize("family", FAMILY_PARENTS + MOE_PARENTS)
def test_generation_with_kv_cache_computes_transformers_logits(family):
    parent = make_family_parent(family)
    child = to_puzzle(parent)
    prompt = torch.randint(3, 320, (2, FAMILY_WINDOW + 2))
    kwargs = dict(max_new_tokens=2 * FAMILY_WINDOW, do_sample=False, pad_token_id=0, eos_token_id=None,
                  output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = parent.generate(prompt, use_cache=True, **kwargs)
        cached = child.generate(prompt, use_cache=True, **kwargs)
        uncached = child.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, ref.sequences)
    assert torch.equal(uncached.sequences, ref.sequences)
    for r, c, u in zip(ref.logits, cached.logits, uncached.logits):
        assert (c - r).abs().max() <= ATOL
        assert (u - r).abs().max() <= ATOL


def test_windows_that_never_bind_change_nothing_and_binding_ones_do():
    child = to_puzzle(make_family_parent("mistral"))
    unwindowed = to_puzzle(make_family_parent("mistral_nowindow"))  # the same weights (same seed), no window
    assert windows_of(child.config) == [FAMILY_WINDOW] * 4 and windows_of(unwindowed.config) == [None] * 4
    x = torch.randint(3, 320, (1, SEQ))
    with torch.no_grad():
        windowed, full = child(x).logits, unwindowed(x).logits
    torch.testing.assert_close(windowed[:, :FAMILY_WINDOW], full[:, :FAMILY_WINDOW], atol=ATOL, rtol=0)
    assert (windowed[:, FAMILY_WINDOW:] - full[:, FAMILY_WINDOW:]).abs().max() > 1e-3


@pytest.mark.parametrize("family, windows", [
    ("llama", None), ("mistral", [FAMILY_WINDOW] * 4), ("mistral_nowindow", None),
    ("qwen2", [None, None, FAMILY_WINDOW, FAMILY_WINDOW]), ("qwen3", [None, None, None, FAMILY_WINDOW]),
])
def test_conversion_records_the_family_and_each_layers_window(family, windows):
    config = puzzle_config_from(make_family_config(family))
    assert config.family == family.removesuffix("_nowindow")
    assert windows_of(config) == (windows or [None] * 4)  # each parent block's own window
    assert "sliding_windows" not in config.to_dict()  # one place: the blocks' window_length
    again = puzzle_config_from(config)  # a child's config converts to itself
    assert (again.family, again.blocks) == (config.family, config.blocks)


def test_qwen2_without_sliding_window_has_none():
    config = puzzle_config_from(make_family_config("qwen2", use_sliding_window=False))
    assert windows_of(config) == [None] * 4


def test_attention_parts_follow_the_descriptor():
    qwen2 = to_puzzle(make_family_parent("qwen2")).model.layers[0].self_attn
    assert qwen2.q_proj.bias is not None and qwen2.k_proj.bias is not None and qwen2.o_proj.bias is None
    qwen3 = to_puzzle(make_family_parent("qwen3")).model.layers[0].self_attn
    assert qwen3.q_norm.weight.shape == (24,) and qwen3.q_proj.out_features == 4 * 24
    llama_bias = to_puzzle(make_family_parent("llama", attention_bias=True)).model.layers[0].self_attn
    assert llama_bias.o_proj.bias is not None  # Llama's attention_bias puts a bias on all four
    assert set(FAMILIES) == {"llama", "mistral", "qwen2", "qwen3",  # MoE: test_families_moe.py, gpt-oss:
                             "qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss",  # test_families_gpt_oss.py
                             "nemotron_h"}  # the hybrid: test_mamba.py


def heterogeneous(child: PuzzleForCausalLM) -> PuzzleForCausalLM:
    """One KV head in layer 0, no-op attention in 1, linear attention in 2 (a windowed layer in qwen2), a
    smaller FFN in 3 (windowed in every windowed family) and a window variant of its attention, narrower
    than the family's."""
    torch.manual_seed(1)
    replace_sublayer(child, 0, "attention", AttentionConfig(n_heads_in_group=4))
    replace_sublayer(child, 1, "attention", AttentionConfig(no_op=True))
    replace_sublayer(child, 2, "attention", AttentionConfig(replace_with_linear=True))
    replace_sublayer(child, 3, "ffn", FFNConfig(intermediate_size=48))
    replace_sublayer(child, 3, "attention", child.config.blocks[3].attention.with_window(FAMILY_WINDOW - 2),
                     sublayer_state(child, 3, "attention"))
    return child.eval()


@torch.no_grad()
@pytest.mark.slow
def test_heterogeneous_children_reload_with_remote_code_alone(tmp_path):
    x = torch.randint(3, 320, (2, SEQ))
    dirs, expected = {}, {}
    for family in FAMILY_PARENTS:
        child = heterogeneous(to_puzzle(make_family_parent(family)))
        dirs[family] = save_model(child, tmp_path / family, make_tokenizer())
        assert (dirs[family] / "family.py").exists()
        expected[family] = child(x).logits
        # the KV cache generation path agrees with the cacheless one on the heterogeneous child too
        kwargs = dict(max_new_tokens=FAMILY_WINDOW + 2, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(child.generate(x[:, :4], use_cache=True, **kwargs),
                           child.generate(x[:, :4], use_cache=False, **kwargs))
    got, stdout = reload_elsewhere(dirs, x, tmp_path, remote_code=True)
    for family in FAMILY_PARENTS:
        assert f"{family} PuzzleForCausalLM transformers_modules" in stdout
        assert torch.equal(got[family], expected[family])


@pytest.mark.parametrize("family", FAMILY_PARENTS)
def test_parents_load_from_a_directory_and_a_safetensors_file(family, tmp_path):
    from puzzle.model.checkpoint import load_model

    parent = make_family_parent(family)
    parent.save_pretrained(tmp_path / "parent", safe_serialization=True)
    x = torch.randint(3, 320, (1, SEQ))
    with torch.no_grad():
        ref = parent(x).logits
        for source in (tmp_path / "parent", tmp_path / "parent" / "model.safetensors"):
            assert (to_puzzle(load_model(source))(x).logits - ref).abs().max() <= ATOL


def write_family_gguf(model, tokenizer, path):
    """`model` (transformers' Qwen2 / Qwen3) as llama.cpp's own qwen2 / qwen3 GGUF, f32, as convert_hf_to_gguf.py
    `Qwen2Model` writes it (no q/k permutation: that is LlamaModel's alone)."""
    import gguf

    from puzzle.export.llamacpp import _write_vocab

    c = model.config
    arch = {"qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}[c.model_type]
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(model.model.layers[0].self_attn.head_dim)
    w.add_value_length(model.model.layers[0].self_attn.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    _write_vocab(w, tokenizer, c.vocab_size)
    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_parents_load_from_gguf_through_transformers_loader(family, tmp_path):
    """transformers' GGUF loader reads qwen2 / qwen3 (integrations/ggml.py); it maps no `key_length`, so a
    Qwen3 GGUF is read with Qwen3Config's default head_dim (128): the tiny parent uses that one."""
    from puzzle.model.checkpoint import load_model

    overrides = {"use_sliding_window": False, "layer_types": None}  # GGUF metadata carries no window
    if family == "qwen3":
        overrides["head_dim"] = 128
    parent = make_family_parent(family, **overrides)
    path = write_family_gguf(parent, make_tokenizer(), tmp_path / f"{family}.gguf")
    child = to_puzzle(load_model(path))
    assert child.config.family == family
    x = torch.randint(3, 320, (1, SEQ))
    with torch.no_grad():
        assert (child(x).logits - parent(x).logits).abs().max() <= ATOL


@pytest.mark.parametrize("config_class, kwargs", [
    ("GemmaConfig", {}),
    ("OlmoeConfig", {}),  # Qwen2-MoE, Qwen3-MoE, Mixtral and gpt-oss are families (test_families_moe.py)
])
def test_unsupported_families_end_in_one_line_naming_the_supported(config_class, kwargs, tmp_path, capsys):
    """Gemma (sandwich norms, GeGLU), MoE and other families: one line, exit 2, the supported list named."""
    import transformers

    from puzzle.cli import main

    config = getattr(transformers, config_class)(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                                 **kwargs)
    config.save_pretrained(tmp_path / "parent")
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "parent"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"unsupported architecture {config.model_type!r}" in err
    assert all(t in err for t in ("llama", "mistral", "qwen2", "qwen3"))


def test_a_windowed_parent_loads_truncated_with_the_windows_of_the_layers_kept(tmp_path):
    """A BLD worker's truncated parent (`load_puzzle(last_layer=...)`) keeps the windows of its layers."""
    from puzzle.model.checkpoint import load_puzzle

    parent = make_family_parent("qwen2")  # windows on layers 2 and 3
    parent.save_pretrained(tmp_path / "parent", safe_serialization=True)
    truncated = load_puzzle(tmp_path / "parent", last_layer=2)
    assert windows_of(truncated.config) == [None, None, FAMILY_WINDOW]
    assert truncated.model.layers[2].self_attn.window == FAMILY_WINDOW
