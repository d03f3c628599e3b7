"""Pruning to a standard Llama: zero-importance units go without changing the outputs; shapes, depth
choices and parameter targets; the checkpoint loads in plain transformers; the CLI commands."""

import json

import numpy as np
import pytest
import torch
from conftest import REFERENCE_GGUF, make_llama, requires_reference
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from puzzle.errors import PuzzleError
from puzzle.model.checkpoint import to_puzzle
from puzzle.pruning.commands import importance, prune
from puzzle.pruning.importance import compute_importance, load_importance
from puzzle.pruning.prune import PrunePlan, layers_to_drop, prune_model, save_pruned
from puzzle.pruning.shape import layers_for_target, parse_param_count, width_for_target
from puzzle.shape import ModelShape

IDS = torch.randint(3, 320, (12, 24), generator=torch.Generator().manual_seed(0))
DEAD_NEURONS = torch.arange(0, 128, 4)  # 32 of 128
DEAD_CHANNELS = torch.tensor([3, 17, 40, 63])


@torch.no_grad()
def _plant_dead_units(model: LlamaForCausalLM) -> LlamaForCausalLM:
    d = model.config.head_dim
    model.model.embed_tokens.weight[:, DEAD_CHANNELS] = 0
    for i, layer in enumerate(model.model.layers):
        layer.mlp.gate_proj.weight[DEAD_NEURONS] = 0
        g = i % 2  # a different dead KV group (both of its query heads) per layer
        layer.self_attn.v_proj.weight[g * d : (g + 1) * d] = 0
        layer.self_attn.o_proj.weight[DEAD_CHANNELS] = 0
        layer.mlp.down_proj.weight[DEAD_CHANNELS] = 0
    return model


@pytest.mark.parametrize("tied", [False, True])
@torch.no_grad()
def test_pruning_zero_importance_units_keeps_outputs(tied):
    model = _plant_dead_units(make_llama(tie_word_embeddings=tied))
    parent = to_puzzle(model)
    scores = compute_importance(parent, [IDS[:6], IDS[6:]], progress=False)
    plan = PrunePlan(hidden_size=60, intermediate_size=96, kv_groups=1)
    pruned, record = prune_model(parent, scores, plan)
    assert isinstance(pruned, LlamaForCausalLM)
    c = pruned.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (60, 96, 2, 1)
    assert not set(record["channels"]) & set(DEAD_CHANNELS.tolist())
    assert torch.allclose(pruned(IDS).logits, model(IDS).logits, atol=1e-4)
    # without the norm rescale, dropping even all-zero channels changes the RMS and so the outputs
    unscaled, _ = prune_model(parent, scores, PrunePlan(hidden_size=60, rescale_norms=False))
    assert not torch.allclose(unscaled(IDS).logits, model(IDS).logits, atol=1e-3)


@torch.no_grad()
def test_pruning_live_units_changes_outputs_and_keeps_the_best():
    model = make_llama()
    parent = to_puzzle(model)
    scores = compute_importance(parent, [IDS], progress=False)
    pruned, _ = prune_model(parent, scores, PrunePlan(intermediate_size=64, heads_per_group=1))
    assert pruned.config.num_attention_heads == 2 and pruned.config.num_key_value_heads == 2
    assert not torch.allclose(pruned(IDS).logits, model(IDS).logits, atol=1e-3)
    # layer 0's FFN keeps exactly the 64 best neurons, in the parent's order
    best = torch.sort(scores["layers.0.neurons"], descending=True).indices[:64].sort().values
    assert torch.equal(pruned.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight[best])


def test_pruned_checkpoint_loads_in_plain_transformers(tmp_path, tiny_tokenizer):
    model = _plant_dead_units(make_llama())
    parent = to_puzzle(model)
    scores = compute_importance(parent, [IDS], progress=False)
    pruned, record = prune_model(parent, scores, PrunePlan(hidden_size=60, intermediate_size=96, drop_layers=(1,)))
    out = save_pruned(pruned, tmp_path / "student", tiny_tokenizer, record)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config and config["head_dim"] == 16
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded) is LlamaForCausalLM
    with torch.no_grad():
        assert torch.allclose(loaded(IDS).logits, pruned(IDS).logits, atol=1e-5)
    assert json.loads((out / "pruning.json").read_text())["kept_layers"] == [0, 2, 3]


def test_prune_refuses_a_heterogeneous_child():
    from puzzle.model import FFNConfig
    from puzzle.model.surgery import replace_sublayer

    parent = to_puzzle(make_llama())
    scores = compute_importance(parent, [IDS], progress=False)
    replace_sublayer(parent, 1, "ffn", FFNConfig(no_op=True))
    with pytest.raises(PuzzleError, match="uniform"):
        prune_model(parent, scores, PrunePlan(intermediate_size=64))


def test_bad_plans_fail_clearly():
    parent = to_puzzle(make_llama())
    scores = compute_importance(parent, [IDS], progress=False)
    for plan, match in ((PrunePlan(hidden_size=65), "hidden size"), (PrunePlan(kv_groups=3), "KV groups"),
                        (PrunePlan(drop_layers=(0, 1, 2, 3)), "at least one"), (PrunePlan(drop_layers=(7,)), "distinct"),
                        (PrunePlan(hidden_size=62), "multiple of the 4 query heads")):
        with pytest.raises(PuzzleError, match=match):
            prune_model(parent, scores, plan)


def test_layers_to_drop_methods():
    scores = {
        "layers.block_importance": torch.tensor([0.9, 0.1, 0.5, 0.05, 0.3, 0.8]),
        "layers.drop_loss.k1": torch.tensor([9.0, 2.0, 3.0, 4.0, 1.0, 8.0]),
        "layers.drop_loss.k2": torch.tensor([9.0, 5.0, 2.5, 2.0, 7.0]),
    }
    assert layers_to_drop(scores, 2, "bi") == [1, 3]
    assert layers_to_drop(scores, 2, "loss") == [1, 4]
    assert layers_to_drop(scores, 2, "block") == [3, 4]
    assert layers_to_drop(scores, 0, "block") == []
    with pytest.raises(PuzzleError, match="--block-sizes 3"):
        layers_to_drop(scores, 3, "block")


@pytest.mark.parametrize("tied", [False, True])
def test_shape_counts_the_real_parameters(tied):
    model = make_llama(tie_word_embeddings=tied)
    shape = ModelShape.from_config(model.config)
    assert shape.total_params() == sum(p.numel() for p in model.parameters())
    assert shape.total_params() - shape.non_embedding_params() == shape.embedding_params


def test_param_targets():
    assert parse_param_count("80M") == 80_000_000
    assert parse_param_count("1.2B") == 1_200_000_000
    assert parse_param_count("80000000") == 80_000_000
    assert parse_param_count("250k") == 250_000
    with pytest.raises(PuzzleError, match="80M"):
        parse_param_count("eighty")
    parent = ModelShape(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=1536,
                        num_hidden_layers=30, vocab_size=49152, tie_word_embeddings=True)  # SmolLM2-135M
    target = int(0.6 * parent.non_embedding_params())
    width = width_for_target(parent, target, "non-embedding")
    assert abs(width.non_embedding_params() - target) / target <= 0.02
    # hidden: a multiple of 8 and of the 9 query heads (transformers requires the latter); FFN of 64
    assert width.hidden_size % 72 == 0 and width.intermediate_size % 64 == 0 and width.num_attention_heads == 9
    assert layers_for_target(parent, target, "non-embedding") == 12
    with pytest.raises(PuzzleError, match="not below"):
        width_for_target(parent, parent.total_params() + 1)


def _write_run_dir(run_dir, n_train=24, n_val=4, seq_len=24):
    """Prepared data in the documented layout (puzzle.data.blocks): {train,val}.bin + meta.json."""
    data = run_dir / "data"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        rng.integers(3, 320, (n, seq_len)).astype(np.uint16).tofile(data / f"{split}.bin")
    meta = {"dtype": "uint16", "seq_len": seq_len, "n_train_blocks": n_train, "n_val_blocks": n_val}
    (data / "meta.json").write_text(json.dumps(meta))


def test_importance_and_prune_commands(tmp_path, tiny_parent_dir, capsys):
    run_dir = tmp_path / "run"
    _write_run_dir(run_dir)
    importance(tiny_parent_dir, run_dir=run_dir, n_samples=16, seq_len=12, batch_size=4, block_sizes=[1, 2],
               drop_samples=8)
    scores = load_importance(run_dir)
    assert {"layers.3.neurons", "layers.3.kv_groups", "channels", "layers.drop_loss.k2"} <= scores.keys()
    settings = json.loads((run_dir / "importance" / "settings.json").read_text())
    assert settings["n_samples"] == 16 and settings["block_sizes"] == [1, 2] and settings["drop_batches"] == 2
    importance(tiny_parent_dir, run_dir=run_dir, n_samples=16, seq_len=12, batch_size=4, block_sizes=[1, 2],
               drop_samples=8)
    assert "nothing to do" in capsys.readouterr().out

    out = prune(tiny_parent_dir, tmp_path / "depth", run_dir=run_dir, drop_layers=2, depth_method="block")
    record = json.loads((out / "pruning.json").read_text())
    start = int(torch.argmin(scores["layers.drop_loss.k2"]))
    assert record["dropped_layers"] == [start, start + 1]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2

    parent = ModelShape.from_config(make_llama().config)
    target = parent.total_params() * 3 // 4
    out = prune(tiny_parent_dir, tmp_path / "width", run_dir=run_dir, target_params=str(target))
    shape = ModelShape.from_config(AutoModelForCausalLM.from_pretrained(out).config)
    assert abs(shape.total_params() - target) / target <= 0.1 and shape.num_hidden_layers == 4
    out = prune(tiny_parent_dir, tmp_path / "deep", run_dir=run_dir, target_params=str(target), target_mode="depth",
                depth_method="bi")
    assert ModelShape.from_config(AutoModelForCausalLM.from_pretrained(out).config).num_hidden_layers == 3


def test_prune_without_importance_fails_clearly(tmp_path, tiny_parent_dir):
    with pytest.raises(PuzzleError, match="puzzle importance"):
        prune(tiny_parent_dir, tmp_path / "out", run_dir=tmp_path / "run", ffn_size=64)


@pytest.mark.smoke
@requires_reference
@pytest.mark.slow
def test_reference_parent_prunes_to_a_plain_llama(tmp_path):
    from puzzle.model.checkpoint import load_model

    parent = to_puzzle(load_model(REFERENCE_GGUF))
    ids = torch.randint(0, parent.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    scores = compute_importance(parent, [ids], block_sizes=(), progress=False)
    with torch.no_grad():
        same, _ = prune_model(parent, scores, PrunePlan())
        assert torch.allclose(same(ids).logits, parent(ids).logits, atol=1e-4)
        target = int(0.6 * ModelShape.from_config(parent.config).non_embedding_params())
        shape = width_for_target(ModelShape.from_config(parent.config), target, "non-embedding")
        pruned, record = prune_model(parent, scores, PrunePlan(hidden_size=shape.hidden_size,
                                                               intermediate_size=shape.intermediate_size))
        out = save_pruned(pruned, tmp_path / "width", None, record)
        loaded = AutoModelForCausalLM.from_pretrained(out)
        assert sum(p.numel() for p in loaded.parameters()) == shape.total_params()
        assert torch.isfinite(loaded(ids).logits).all()
