"""`puzzle run` end to end on a tiny NemotronH parent (issue 26): the search over a hybrid's layers, each kept
or dropped by kind (tests/hybrid.py: Mamba2, MoE, attention, MLP layers), BLD of the attention, MLP and MoE
variants, scoring, solve, realize, GKD, evaluate and the report, with Minitron's importance (its neuron scores
rank the MLP's and experts' neurons for BLD's init). Minitron's baseline is not part of it (its --target-params
picks a uniform shape, which a hybrid refuses; prune itself: tests/pruning/test_pruning_hybrid.py)."""

import json

import pytest
import yaml

from puzzle.cli import main
from puzzle.model.blocks import BlockConfig
from puzzle.shape import ModelShape

from conftest import make_tokenizer
from hybrid import make_nemotron_h_config, make_nemotron_h_parent
from test_pipeline import tiny_config

# Mamba2 layers keep the parent's mixer or drop it; attention layers take fewer KV heads or none; MLP layers
# narrower or none; MoE layers fewer experts or a smaller top-k
HYBRID_SPACE = {"name": "hybrid_tiny", "target_engine": "transformers",
                "attention": {"kv_heads": "halves", "no_op": True},
                "ffn": {"ratios": [1.0, 0.5], "no_op": True, "moe": {"expert_ratios": [1.0, 0.5], "top_k": [2, 1]}}}


@pytest.mark.slow
def test_run_end_to_end_on_a_nemotron_h_parent(tmp_path, capsys):
    parent_dir = tmp_path / "parent"
    make_nemotron_h_parent().save_pretrained(parent_dir, safe_serialization=True)
    make_tokenizer().save_pretrained(parent_dir)
    raw = tiny_config(tmp_path, parent_dir)
    del raw["baselines"]  # --target-params: a uniform shape, refused for a hybrid
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(HYBRID_SPACE))
    raw["search_space"] = str(tmp_path / "space.yaml")
    shape = ModelShape.from_config(make_nemotron_h_config())
    # a ceiling that dropping one Mamba2 layer or narrowing the MLP alone does not meet: the child differs from
    # the parent in more than one layer
    mamba = shape.params(shape.parent_blocks[0])
    raw["solve"] = [{"budget": "h100_80gb", "max_params": shape.total_params() - mamba - 1, "name": "fast"}]
    config = tmp_path / "hybrid.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["run", str(config)]) == 0, capsys.readouterr().err
    run = tmp_path / "run"
    child = json.loads((run / "children" / "fast" / "config.json").read_text())
    assert child["family"] == "nemotron_h" and child["model_type"] == "nemotron-nas"
    blocks = [BlockConfig.from_dict(b, child["hidden_size"]) for b in child["block_configs"]]
    assert len(blocks) == 6 and blocks != shape.parent_blocks
    for block, parent in zip(blocks, shape.parent_blocks):  # each layer stays its own kind, or is dropped
        assert block.attention.no_op or block.attention.is_mamba == parent.attention.is_mamba
        assert block.ffn.no_op or block.ffn.is_moe == parent.ffn.is_moe
        assert not parent.attention.no_op or block.attention.no_op  # an MLP / MoE layer gains no mixer
        assert not parent.ffn.no_op or block.ffn.no_op
        assert not block.attention.is_mamba or block.attention == parent.attention  # parent width (vLLM)
    assert shape.total_params(blocks) <= shape.total_params() - mamba - 1
    from safetensors.torch import load_file

    scores = load_file(run / "importance" / "importance.safetensors")  # the relu2 MLP's neurons, the experts'
    assert scores["layers.3.neurons"].shape == (96,) and scores["layers.1.experts.neurons"].shape == (8, 32)
    assert "layers.2.heads" in scores and not any(k.startswith("layers.0.") and "neurons" in k for k in scores)
    evaluated = {p.stem for p in (run / "eval").glob("*.json")}
    assert {"parent", "fast", "fast+gkd"} <= evaluated
    assert json.loads((run / "eval" / "parent.json").read_text())["validation"]["kl"] == 0.0
    assert (run / "report.md").exists()
    # the searched child, Mamba2 / MLP / MoE layers dropped or not, exports as vLLM's layout and loads back
    import torch
    from transformers import AutoModelForCausalLM

    from puzzle.model.checkpoint import load_puzzle

    out = tmp_path / "export"
    assert main(["export", str(run / "children" / "fast" / "gkd" / "model"), str(out), "--format", "nemotron-h-puzzle"]) == 0
    pattern = json.loads((out / "config.json").read_text())["hybrid_override_pattern"]
    assert len(pattern) == sum(not (b.attention.no_op and b.ffn.no_op) for b in blocks)
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    child_model = load_puzzle(run / "children" / "fast" / "gkd" / "model")
    x = torch.randint(3, 320, (2, 17))
    with torch.no_grad():
        assert (loaded(x, use_cache=False).logits - child_model(x).logits).abs().max() <= 1e-4
