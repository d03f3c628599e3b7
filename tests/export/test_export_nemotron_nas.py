"""`puzzle export --format nemotron-nas`: the checkpoint engines load, reloaded by transformers
(trust_remote_code, in a process without `puzzle`) with the child's logits."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from puzzle.errors import PuzzleError
from puzzle.export.commands import export
from puzzle.model.blocks import ffn_mult_to_intermediate_size

from safetensors_reference import reference_bytes
from tiny_children import logits, make_child, save_child

# Every block kind, FFN widths on the ffn_mult grid (multiples of 256) that engines rebuild widths from:
# TensorRT-LLM (and transformers) build them all, vLLM neither linear kind.
BLOCKS = ["attn_g2+ffn_512", "attn_noop+ffn_256", "attn_linear+ffn_linear", "attn_g4+ffn_noop", "attn_g1+ffn_256"]
VLLM_BLOCKS = ["attn_g2+ffn_512", "attn_noop+ffn_256", "attn_g4+ffn_noop", "attn_g1+ffn_256"]
TOKENS = [5, 17, 300, 42, 7, 99, 123, 250, 8, 64, 11]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.slow
def test_reloads_in_transformers_without_puzzle_with_equal_logits(tmp_path, tied):
    child = make_child(BLOCKS, intermediate_size=512, tie_word_embeddings=tied)
    out = export(save_child(child, tmp_path / "child"), tmp_path / "nas", format="nemotron-nas", engine="transformers")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        assert "puzzle" not in sys.modules, "the export must load without the puzzle package"
        assert model.config.model_type == "nemotron-nas", model.config.model_type
        with torch.no_grad():
            save_file({{"logits": model(torch.tensor([{TOKENS}])).logits[0]}}, {str(tmp_path / "logits.safetensors")!r})
        """
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    got = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    torch.testing.assert_close(got, logits(child, TOKENS), rtol=0, atol=1e-5)


def test_config_and_weights_carry_what_engines_read(tmp_path):
    """Read as vLLM's nemotron_nas.py reads it: names, top-level RoPE, widths from ffn_mult, the LM head."""
    child = make_child(VLLM_BLOCKS, intermediate_size=512, tie_word_embeddings=True)
    out = export(save_child(child, tmp_path / "child"), tmp_path / "nas", format="nemotron-nas")
    config = json.loads((out / "config.json").read_text())
    weights = load_file(str(out / "model.safetensors"))
    assert config["model_type"] == "nemotron-nas" and config["architectures"] == ["DeciLMForCausalLM"]
    assert config["rope_theta"] == child.config.rope_parameters["rope_theta"] and config["rope_scaling"] is None
    for i, block in enumerate(config["block_configs"]):
        if block["ffn"]["no_op"] or block["ffn"]["replace_with_linear"]:
            assert f"model.layers.{i}.mlp.down_proj.weight" not in weights
            continue
        width = ffn_mult_to_intermediate_size(block["ffn"]["ffn_mult"], config["hidden_size"])
        assert weights[f"model.layers.{i}.mlp.down_proj.weight"].shape == (config["hidden_size"], width)
    assert torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])


def test_bf16_export_holds_bf16_weights(tmp_path):
    child = make_child(BLOCKS, intermediate_size=512)
    out = export(save_child(child, tmp_path / "child"), tmp_path / "nas", format="nemotron-nas", dtype="bf16",
                 engine="trtllm")
    weights = load_file(str(out / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("dtype", ["auto", "bf16"])
def test_the_streamed_weights_file_is_the_serialised_one(tmp_path, dtype):
    """Streamed tensor by tensor, converted as each is written: the bytes of the whole converted state
    serialised at once (what the export wrote before), a tied head stored as its own tensor."""
    child = make_child(BLOCKS, intermediate_size=512, tie_word_embeddings=True)
    out = export(save_child(child, tmp_path / "child"), tmp_path / "nas", format="nemotron-nas", dtype=dtype,
                 engine="trtllm")
    to = torch.bfloat16 if dtype == "bf16" else torch.float32
    state = {k: v.detach().to(to) for k, v in child.state_dict().items() if "rotary_emb" not in k}
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    assert (out / "model.safetensors").read_bytes() == reference_bytes(state, {"format": "pt"})


def test_width_off_the_ffn_mult_grid_is_refused_by_layer(tmp_path):
    path = save_child(make_child(["attn_g2+ffn_512", "attn_g2+ffn_96"], intermediate_size=512), tmp_path / "child")
    with pytest.raises(PuzzleError, match=r"^layer 1 \(attn_g2\+ffn_96\) cannot be exported as nemotron-nas: "
                                          r"FFN width 96 is off the ffn_mult grid"):
        export(path, tmp_path / "nas", format="nemotron-nas")
    assert not (tmp_path / "nas").exists()


# Children each of whose layers some engine of the format cannot build (issue 24: linear attention crashed
# vLLM's DeciLMDecoderLayer; SGLang refuses variable GQA; vLLM's first FFN needs an attention before it).
ENGINE_CHILDREN = {
    "linear_attention": ["attn_g2+ffn_512", "attn_linear+ffn_512"],
    "linear_ffn": ["attn_g2+ffn_512", "attn_g2+ffn_linear"],
    "variable_gqa": ["attn_g2+ffn_512", "attn_g4+ffn_256", "attn_g1+ffn_512"],
    "first_layer_without_attention": ["attn_noop+ffn_512", "attn_g2+ffn_256"],
    "every_vllm_kind": VLLM_BLOCKS,
}


@pytest.mark.parametrize("engine", ["vllm", "sglang", "trtllm", "transformers"])
@pytest.mark.parametrize("child", sorted(ENGINE_CHILDREN))
def test_an_export_is_held_to_its_engines_rules(tmp_path, engine, child, capsys):
    """`--engine` names whom the nemotron-nas export is for (vllm by default): a child that engine cannot
    build is refused in one line, exit 2, nothing written, naming the engines that can; the rest export."""
    from puzzle.cli import main
    from puzzle.engines import ENGINES, violations
    from puzzle.model.blocks import BlockConfig

    blocks = ENGINE_CHILDREN[child]
    path = save_child(make_child(blocks, intermediate_size=512), tmp_path / "child")
    broken = violations(ENGINES[engine], [BlockConfig.from_name(b) for b in blocks], 64)
    capsys.readouterr()
    code = main(["export", str(path), str(tmp_path / "nas"), "--format", "nemotron-nas", "--engine", engine])
    err = capsys.readouterr().err.strip()
    if broken:
        assert code == 2 and not (tmp_path / "nas").exists()
        assert err.startswith(f"puzzle: error: cannot export as nemotron-nas for {engine}: ") and "\n" not in err
        assert f"layer {broken[0][0]}" in err and "can serve it" in err
    else:
        assert code == 0 and (tmp_path / "nas" / "config.json").exists(), err


def test_the_default_engine_is_vllm_and_a_foreign_engine_is_refused(tmp_path):
    path = save_child(make_child(ENGINE_CHILDREN["linear_attention"], intermediate_size=512), tmp_path / "child")
    with pytest.raises(PuzzleError, match=r"^cannot export as nemotron-nas for vllm: .*no linear .*attention.*"
                                          r"--engine trtllm or transformers can serve it$"):
        export(path, tmp_path / "nas", format="nemotron-nas")
    with pytest.raises(PuzzleError, match="cannot export as gguf for engine 'vllm'"):
        export(path, tmp_path / "x.gguf", format="gguf", engine="vllm")
    assert not (tmp_path / "nas").exists() and not (tmp_path / "x.gguf").exists()
