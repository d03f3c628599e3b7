"""`puzzle export --format plain` (issue 25): a child whose layers are all alike is written as its family's own
checkpoint; transformers' class of that family loads it without custom code and computes the child's logits.
A heterogeneous child is refused in one line (it stays in the puzzle format)."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from puzzle.cli import main
from puzzle.library.init import init_moe_ffn
from puzzle.model import FFNConfig, MoEConfig
from puzzle.model.checkpoint import load_puzzle, save_model, to_puzzle
from puzzle.model.surgery import replace_sublayer, sublayer_state

from conftest import make_family_parent, make_tokenizer


def _narrowed(family: str, layers: list[int] | None = None):
    """The parent as a puzzle model with every MoE layer (or only `layers`) keeping fewer experts, top-1 and
    half-width experts (parent weights sliced by init_moe_ffn; no training needed for a round trip)."""
    child = to_puzzle(make_family_parent(family))
    torch.manual_seed(0)
    for i, block in enumerate(child.config.blocks):
        if not block.ffn.is_moe or (layers is not None and i not in layers):
            continue
        own = block.ffn.moe
        new = MoEConfig(own.num_experts // 2, 1, own.expert_size // 2, own.shared_expert_size)
        from puzzle.library.init import FFNCalibration

        calib = FFNCalibration(torch.rand(own.num_experts, own.expert_size), 1, torch.zeros(0), torch.zeros(0))
        state, _, _ = init_moe_ffn(sublayer_state(child, i, "ffn"), own, new, calibration=calib)
        replace_sublayer(child, i, "ffn", FFNConfig(moe=new), state)
    return child.eval()


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe"])
@pytest.mark.slow
def test_a_uniform_moe_child_exports_as_its_familys_plain_checkpoint(family, tmp_path, capsys):
    child = _narrowed(family)
    save_model(child, tmp_path / "child", make_tokenizer())
    assert main(["export", str(tmp_path / "child"), str(tmp_path / "plain"), "--format", "plain"]) == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["model_type"] == family and "auto_map" not in config and "block_configs" not in config
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()  # transformers' own class, no remote code
    assert type(plain).__name__ == AutoConfig.from_pretrained(tmp_path / "plain").architectures[0]
    ids = torch.randint(0, child.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, child(ids).logits, rtol=1e-4, atol=1e-4)


def test_a_heterogeneous_moe_child_is_refused_in_one_line(tmp_path, capsys):
    child = _narrowed("mixtral", layers=[1])  # layer 1 keeps 2 experts, the others 4
    save_model(child, tmp_path / "child", make_tokenizer())
    capsys.readouterr()
    assert main(["export", str(tmp_path / "child"), str(tmp_path / "plain"), "--format", "plain"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "differ in MoE experts, top-k or width (moe_e4k2_i128, moe_e2k1_i64)" in err
    assert "puzzle format" in err
    assert not (tmp_path / "plain").exists()
    # the puzzle format holds it: experts and top-k per layer, the same logits back
    ids = torch.randint(0, child.config.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(load_puzzle(tmp_path / "child")(ids).logits, child(ids).logits)


@pytest.mark.parametrize("argv", [["--format", "gguf"], ["--format", "nemotron-nas"], ["--format", "anymodel"]])
def test_engines_without_moe_loaders_refuse_an_moe_child_in_one_line(argv, tmp_path, capsys):
    """llama.cpp's deci, vLLM's / SGLang's nemotron-nas and Puzzletron's Llama loaders build no MoE FFN
    (puzzle/engines.py MOE_ENGINES): refused before anything is written, naming the engine that can."""
    save_model(to_puzzle(make_family_parent("mixtral")), tmp_path / "child", make_tokenizer())
    capsys.readouterr()
    assert main(["export", str(tmp_path / "child"), str(tmp_path / "out")] + argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot serve mixtral children" in err and "transformers" in err
    assert not (tmp_path / "out").exists()
