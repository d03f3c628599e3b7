import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import make_llama, make_tokenizer
from puzzle.cli import main
from puzzle.library.store import variant_state, write_variant
from puzzle.model import AttentionConfig, BlockConfig, FFNConfig
from puzzle.model.checkpoint import load_config, load_model, puzzle_config_from, save_model, to_puzzle
from puzzle.realize.assemble import assemble_child
from puzzle.model.modeling_puzzle import build_attention, build_ffn
from puzzle.model.surgery import replace_sublayer
from puzzle.io import atomic_write_json


def random_state(config, kind, variant_config, seed):
    """A library entry as BLD would leave it: sublayer weights (norm included) in `sublayer_state` form."""
    torch.manual_seed(seed)
    module = build_attention(config, variant_config) if kind == "attention" else build_ffn(config, variant_config)
    prefix, norm = ("self_attn", "input_layernorm") if kind == "attention" else ("mlp", "post_attention_layernorm")
    state = {f"{prefix}.{k}": torch.randn_like(v) * 0.08 for k, v in module.state_dict().items()}
    state[f"{norm}.weight"] = 1 + 0.1 * torch.randn(config.hidden_size)
    return state


def test_realised_child_equals_parent_with_blocks_swapped(tiny_parent_dir, tmp_path, capsys):
    run = tmp_path / "run"
    parent = to_puzzle(load_model(tiny_parent_dir))
    parent_att, parent_ffn = parent.config.blocks[0].attention, parent.config.blocks[0].ffn
    chosen = [
        BlockConfig(parent_att, parent_ffn),
        BlockConfig(AttentionConfig(no_op=True), FFNConfig(intermediate_size=64)),
        BlockConfig(AttentionConfig(n_heads_in_group=4), FFNConfig(replace_with_linear=True)),
        BlockConfig(AttentionConfig(replace_with_linear=True), FFNConfig(no_op=True)),
    ]
    expected = copy.deepcopy(parent)
    for layer, block in enumerate(chosen):
        for kind, cfg in (("attention", block.attention), ("ffn", block.ffn)):
            if cfg in (parent_att, parent_ffn):
                continue
            state = {} if cfg.no_op else random_state(parent.config, kind, cfg, seed=10 * layer + len(kind))
            if state:
                write_variant(run, {"layer": layer, "kind": kind, "variant": cfg.name}, state)
            replace_sublayer(expected, layer, kind, cfg, state)
    atomic_write_json(run / "solutions" / "best.json", {
        "block_configs": [b.to_dict(parent.config.hidden_size) for b in chosen],
        "predicted": {"speedup": 1.7},
    })
    assert main(["realize", "--run-dir", str(run), "--parent", str(tiny_parent_dir)]) == 0
    child_dir = run / "children" / "best"
    child = load_model(child_dir)
    x = torch.randint(0, 320, (2, 13))
    with torch.no_grad():
        assert torch.equal(child(x).logits, expected(x).logits)
    rows = json.loads((child_dir / "architecture.json").read_text())
    assert [r["attention"] for r in rows] == ["attn_g2", "attn_noop", "attn_g4", "attn_linear"]
    assert rows[1]["attention_params"] == 0 and rows[3]["ffn_params"] == 0
    assert json.loads((child_dir / "predicted_costs.json").read_text())["speedup"] == 1.7
    # a second realisation of the same solution does nothing
    capsys.readouterr()
    assert main(["realize", "--run-dir", str(run)]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_missing_library_variant_is_one_clear_line(tiny_parent_dir, tmp_path, capsys):
    run = tmp_path / "run"
    parent = to_puzzle(load_model(tiny_parent_dir))
    blocks = parent.config.blocks
    blocks[2] = BlockConfig(blocks[2].attention, FFNConfig(intermediate_size=32))
    atomic_write_json(run / "solutions" / "s.json", {"block_configs": [b.to_dict(64) for b in blocks]})
    capsys.readouterr()
    code = main(["realize", "--run-dir", str(run), "--solution", "s", "--parent", str(tiny_parent_dir)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "run puzzle build-library" in err
    code = main(["realize", "--run-dir", str(run), "--solution", "nope"])
    assert code == 2 and "solutions in" in capsys.readouterr().err


def engine_parent_dir(tmp_path, tied: bool):
    """A tiny parent whose FFN width (512) lies on the ffn_mult grid, so engines other than transformers serve it."""
    from conftest import make_llama, make_tokenizer

    out = tmp_path / "parent"
    make_llama(intermediate_size=512, tie_word_embeddings=tied).save_pretrained(out, safe_serialization=True)
    make_tokenizer().save_pretrained(out)
    return out


def test_a_child_its_target_engine_cannot_serve_is_refused_naming_layer_and_rule(tmp_path, capsys):
    parent_dir = engine_parent_dir(tmp_path, tied=False)
    run = tmp_path / "run"
    blocks = to_puzzle(load_model(parent_dir)).config.blocks
    blocks[2] = BlockConfig(blocks[2].attention, FFNConfig(no_op=True))
    # solve --target-engine records the engine in the solution; realize checks against it
    atomic_write_json(run / "solutions" / "s.json", {"block_configs": [b.to_dict(64) for b in blocks],
                                                     "target_engine": "llamacpp"})
    capsys.readouterr()
    code = main(["realize", "--run-dir", str(run), "--parent", str(parent_dir)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "layer 2 (attn_g2+ffn_noop)" in err and "no no-op FFN after a real" in err and "deci.cpp" in err
    assert not (run / "children" / "s").exists()
    # vLLM builds the same child (a no-op FFN after attention is fine there); the flag wins
    assert main(["realize", "--run-dir", str(run), "--target-engine", "vllm"]) == 0
    assert json.loads((run / "children" / "s" / "realized.json").read_text())["target_engine"] == "vllm"


def test_a_windowed_child_realises_loads_and_runs(tmp_path, capsys):
    """A window variant's library entry is the parent's attention, copied (only the mask differs): the
    realised child writes DeciLM's window_length, loads and computes the parent with that layer's keys narrowed
    to the window, cached or not; a target engine that ignores window_length refuses it."""
    from puzzle.library.init import init_attention
    from puzzle.model.surgery import sublayer_state

    run = tmp_path / "run"
    parent_dir = engine_parent_dir(tmp_path, tied=False)  # on the ffn_mult grid: only the window is refused
    parent = to_puzzle(load_model(parent_dir))
    blocks = parent.config.blocks
    parent_att = blocks[1].attention
    window = parent_att.with_window(3)
    state, method = init_attention(sublayer_state(parent, 1, "attention"), window, 4, 2)
    assert method == "copy"
    write_variant(run, {"layer": 1, "kind": "attention", "variant": window.name}, state)
    blocks[1] = BlockConfig(window, blocks[1].ffn)
    atomic_write_json(run / "solutions" / "w.json", {"block_configs": [b.to_dict(64) for b in blocks]})
    assert main(["realize", "--run-dir", str(run), "--parent", str(parent_dir)]) == 0
    child_dir = run / "children" / "w"
    written = json.loads((child_dir / "config.json").read_text())["block_configs"]
    assert [b["attention"].get("window_length") for b in written] == [None, 3, None, None]
    child = load_model(child_dir)
    assert child.model.layers[1].self_attn.window == 3
    x = torch.randint(0, 320, (2, 13))
    with torch.no_grad():
        got, full = child(x).logits, parent(x).logits
        assert torch.equal(got[:, :3], full[:, :3]) and not torch.allclose(got[:, 3:], full[:, 3:])
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(child.generate(x[:, :4], use_cache=True, **kwargs),
                           child.generate(x[:, :4], use_cache=False, **kwargs))
    capsys.readouterr()
    assert main(["realize", "--run-dir", str(run), "--solution", "w", "--target-engine", "vllm",
                 "--out", str(tmp_path / "vllm")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "window" in err and "nemotron_nas.py" in err


def test_trtllm_target_stores_the_tied_head_by_name(tmp_path, capsys):
    from safetensors import safe_open

    parent_dir = engine_parent_dir(tmp_path, tied=True)
    run = tmp_path / "run"
    blocks = to_puzzle(load_model(parent_dir)).config.blocks
    atomic_write_json(run / "solutions" / "s.json", {"block_configs": [b.to_dict(64) for b in blocks]})
    for engine, stored in (("transformers", False), ("trtllm", True)):
        assert main(["realize", "--run-dir", str(run), "--parent", str(parent_dir), "--target-engine", engine]) == 0
        child = run / "children" / "s"
        with safe_open(str(child / "model.safetensors"), framework="pt") as f:
            assert ("lm_head.weight" in f.keys()) is stored
        config = json.loads((child / "config.json").read_text())
        assert config["model_type"] == "nemotron-nas" and config["architectures"] == ["DeciLMForCausalLM"]
    x = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(load_model(child)(x).logits, load_model(parent_dir)(x).logits, atol=1e-5, rtol=0)


def test_a_child_realised_in_bf16_matches_the_fp32_child_within_bf16_rounding(tiny_parent_dir, tmp_path, capsys):
    run = tmp_path / "run"
    parent = to_puzzle(load_model(tiny_parent_dir))
    att, ffn = parent.config.blocks[0].attention, parent.config.blocks[0].ffn
    chosen = [BlockConfig(att, ffn), BlockConfig(AttentionConfig(n_heads_in_group=4), FFNConfig(intermediate_size=64)),
              BlockConfig(att, FFNConfig(replace_with_linear=True)), BlockConfig(AttentionConfig(no_op=True), ffn)]
    for layer, block in enumerate(chosen):
        for kind, cfg in (("attention", block.attention), ("ffn", block.ffn)):
            if cfg not in (att, ffn) and not cfg.no_op:
                write_variant(run, {"layer": layer, "kind": kind, "variant": cfg.name},
                              random_state(parent.config, kind, cfg, seed=layer))
    atomic_write_json(run / "solutions" / "best.json",
                      {"block_configs": [b.to_dict(parent.config.hidden_size) for b in chosen]})
    children = {}
    for dtype in ("fp32", "bf16"):
        out = run / "children" / dtype
        args = ["realize", "--run-dir", str(run), "--parent", str(tiny_parent_dir), "--out", str(out)]
        assert main([*args, "--dtype", dtype]) == 0
        assert json.loads((out / "realized.json").read_text())["dtype"] == dtype
        children[dtype] = load_model(out, dtype=torch.float32 if dtype == "fp32" else torch.bfloat16)
    with safe_open(str(run / "children" / "bf16" / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # stored in bf16: half the bytes
    x = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        ref = children["fp32"](x).logits
        low = children["bf16"](x).logits.float()
    # bf16 keeps 8 bits of mantissa: a 4-layer forward lands within a few percent of the logits' scale
    scale = ref.abs().mean()
    assert (low - ref).abs().mean() < 0.03 * scale
    assert (low.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    # another dtype is another child: realising it again in fp32 over the bf16 one is not "nothing to do"
    capsys.readouterr()
    out = run / "children" / "bf16"
    assert main(["realize", "--run-dir", str(run), "--out", str(out), "--dtype", "fp32"]) == 0
    assert "nothing to do" not in capsys.readouterr().out


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_realize_writes_the_whole_model_assemblys_safetensors(tmp_path, tied):
    """realize builds the child on the meta device and fills it block by block; it writes exactly what the
    old assembly (parent loaded whole, deep-copied, blocks swapped in) wrote."""
    parent_dir = tmp_path / "parent"
    make_llama(tie_word_embeddings=tied).save_pretrained(parent_dir)
    make_tokenizer().save_pretrained(parent_dir)
    run = tmp_path / "run"
    parent = to_puzzle(load_model(parent_dir))
    own = parent.config.blocks[0]
    chosen = [
        BlockConfig(AttentionConfig(n_heads_in_group=4), own.ffn),
        BlockConfig(own.attention, FFNConfig(intermediate_size=64)),
        BlockConfig(AttentionConfig(no_op=True), FFNConfig(replace_with_linear=True)),
        own,
    ]
    for layer, block in enumerate(chosen):
        for kind, cfg in (("attention", block.attention), ("ffn", block.ffn)):
            if cfg not in (own.attention, own.ffn) and not cfg.no_op:
                write_variant(run, {"layer": layer, "kind": kind, "variant": cfg.name},
                              random_state(parent.config, kind, cfg, seed=layer))
    atomic_write_json(run / "solutions" / "s.json", {"block_configs": [b.to_dict(64) for b in chosen]})
    assert main(["realize", "--run-dir", str(run), "--parent", str(parent_dir)]) == 0
    old = assemble_child(parent, chosen, lambda v: variant_state(run, parent, v))
    save_model(old, tmp_path / "old")
    new_bytes = (run / "children" / "s" / "model.safetensors").read_bytes()
    assert new_bytes == (tmp_path / "old" / "model.safetensors").read_bytes()
    new_config = json.loads((run / "children" / "s" / "config.json").read_text())
    assert new_config == json.loads((tmp_path / "old" / "config.json").read_text())


def test_a_bf16_parents_child_is_stored_in_bf16(tmp_path):
    parent_dir = tmp_path / "parent"
    make_llama().to(torch.bfloat16).save_pretrained(parent_dir)
    make_tokenizer().save_pretrained(parent_dir)
    run = tmp_path / "run"
    blocks = [b.to_dict(64) for b in puzzle_config_from(load_config(parent_dir)).blocks]
    atomic_write_json(run / "solutions" / "s.json", {"block_configs": blocks})
    assert main(["realize", "--run-dir", str(run), "--parent", str(parent_dir)]) == 0
    child = load_file(str(run / "children" / "s" / "model.safetensors"))
    parent = load_file(str(parent_dir / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in child.values())
    assert all(child[k].equal(parent[k]) for k in parent)
