import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import DynamicCache

from puzzle.model import AttentionConfig, FFNConfig, PuzzleForCausalLM
from puzzle.model.checkpoint import save_model, to_puzzle
from puzzle.model.surgery import replace_sublayer

from conftest import make_llama


def test_all_parent_child_matches_transformers_llama(tiny_llama, tiny_parent):
    x = torch.randint(0, 320, (3, 17))
    with torch.no_grad():
        ref = tiny_llama(x).logits
        got = tiny_parent(x).logits
    assert ref.abs().max() > 0.1  # the test would be empty on a degenerate model
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_tied_and_untied_embeddings(tied):
    llama = make_llama(tie_word_embeddings=tied)
    child = to_puzzle(llama)
    assert (child.lm_head.weight.data_ptr() == child.model.embed_tokens.weight.data_ptr()) is tied
    x = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(child(x).logits, llama(x).logits, atol=1e-4, rtol=0)


def test_llama3_rope_scaling_matches():
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    llama = make_llama(rope_parameters=rope)
    child = to_puzzle(llama)
    assert child.config.rope_parameters["rope_type"] == "llama3"
    x = torch.randint(0, 320, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(child(x).logits, llama(x).logits, atol=1e-4, rtol=0)


def mixed_child(parent: PuzzleForCausalLM) -> PuzzleForCausalLM:
    """No-op attention in layer 0, linear FFN in 1, one KV head in 2, a smaller FFN in 3."""
    torch.manual_seed(1)
    replace_sublayer(parent, 0, "attention", AttentionConfig(no_op=True))
    replace_sublayer(parent, 1, "ffn", FFNConfig(replace_with_linear=True))
    replace_sublayer(parent, 2, "attention", AttentionConfig(n_heads_in_group=4))
    replace_sublayer(parent, 3, "ffn", FFNConfig(intermediate_size=48))
    for p in parent.parameters():  # fresh modules are initialised small; make them matter
        if p.ndim == 2:
            p.data.normal_(0, 0.08)
    return parent


def test_greedy_generate_is_the_same_with_and_without_kv_cache(tiny_parent):
    child = mixed_child(tiny_parent)
    prompt = torch.randint(3, 320, (2, 7))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = child.generate(prompt, use_cache=True, **kwargs)
        uncached = child.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (2, 19)
    assert torch.equal(cached, uncached)


def test_kv_cache_holds_nothing_for_noop_and_linear_attention(tiny_parent):
    child = mixed_child(tiny_parent)
    replace_sublayer(child, 1, "attention", AttentionConfig(replace_with_linear=True))
    cache = DynamicCache()
    with torch.no_grad():
        child(torch.randint(0, 320, (1, 5)), past_key_values=cache, use_cache=True)
    # layers 2 and 3 keep a cache (layer 2 with one KV head); 0 (no-op) and 1 (linear) keep nothing
    filled = [layer for layer in cache.layers if layer.get_seq_length() > 0]
    assert len(filled) == 2 == child.config.num_cached_layers
    assert [layer.keys.shape[1] for layer in filled] == [1, 2]


def test_left_padded_batch_matches_unpadded_rows(tiny_parent):
    child = mixed_child(tiny_parent)
    a = torch.randint(3, 320, (1, 9))
    b = torch.randint(3, 320, (1, 6))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = child(batch, attention_mask=mask, position_ids=position_ids).logits
        alone = child(b).logits
    torch.testing.assert_close(padded[1, 3:], alone[0], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_mixed_child_reloads_in_a_process_that_never_imports_puzzle(tiny_parent, tiny_tokenizer, tmp_path):
    child = mixed_child(tiny_parent).eval()
    out = save_model(child, tmp_path / "child", tiny_tokenizer)
    assert sorted(p.name for p in out.glob("*.py")) == ["blocks.py", "configuration_puzzle.py", "family.py", "mamba.py", "modeling_puzzle.py"]
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    x = torch.randint(0, 320, (2, 11))
    with torch.no_grad():
        expected = child(x).logits
    script = textwrap.dedent(
        f"""
        import sys, torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        assert "puzzle" not in sys.modules, "the child must load without the puzzle package"
        x = torch.tensor({x.tolist()})
        with torch.no_grad():
            save_file({{"logits": model(x).logits}}, {str(tmp_path / "logits.safetensors")!r})
        print(type(model).__module__, [b["attention"]["no_op"] for b in model.config.block_configs])
        """
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "transformers_modules" in run.stdout  # the checkpoint's own modeling file, not puzzle's
    got = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    assert torch.equal(got, expected)


def test_registered_in_process_with_auto_classes(tiny_parent, tmp_path):
    from transformers import AutoModelForCausalLM

    child = mixed_child(tiny_parent)
    save_model(child, tmp_path / "child")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "child")
    assert isinstance(again, PuzzleForCausalLM)
    assert again.config.block_configs == child.config.block_configs


def test_gradient_checkpointing_gives_the_gradients_of_the_plain_backward():
    """Per-layer checkpointing (PuzzleDecoderLayer is transformers' GradientCheckpointingLayer) recomputes
    each layer in the backward: same gradients in fp32, on a child with every block kind."""
    child = to_puzzle(make_llama())
    torch.manual_seed(3)
    replace_sublayer(child, 0, "attention", AttentionConfig(no_op=True))
    replace_sublayer(child, 1, "ffn", FFNConfig(replace_with_linear=True))
    replace_sublayer(child, 2, "attention", AttentionConfig(n_heads_in_group=4))
    replace_sublayer(child, 3, "ffn", FFNConfig(intermediate_size=48))
    x = torch.randint(0, 320, (2, 17))
    child.train()

    def grads():
        child.zero_grad()
        out = child(x, output_hidden_states=True, use_cache=False)
        (out.logits.square().mean() + out.hidden_states[2].pow(3).mean()).backward()
        return {n: p.grad.clone() for n, p in child.named_parameters()}

    plain = grads()
    calls = []
    child.activation_checkpointing_enable({"use_reentrant": False})  # gradient_checkpointing_enable in 4.x
    assert child.model.layers[1].gradient_checkpointing
    hook = child.model.layers[1].self_attn.register_forward_pre_hook(lambda *args: calls.append(1))
    checkpointed = grads()
    hook.remove()
    assert len(calls) == 2  # the layer ran again in the backward: its activations were not kept
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    child.eval()  # eval / no_grad forwards (validation, generation) are not checkpointed
    with torch.no_grad():
        child(x)
