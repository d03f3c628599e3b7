"""`puzzle run` end to end on a tiny Qwen3 parent (q/k norms, explicit head_dim, a windowed layer) and a tiny
Mistral parent whose sliding window binds at the run's sequence length: every stage, Minitron baseline included."""

import json

import pytest
import yaml
from transformers import AutoConfig

from puzzle.cli import main
from puzzle.run_dir import RunDir

from conftest import FAMILY_WINDOW, make_family_parent, make_tokenizer
from test_pipeline import tiny_config


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
@pytest.mark.slow
def test_run_end_to_end_on_a_family_parent(family, tmp_path, capsys):
    parent_dir = tmp_path / "parent"
    make_family_parent(family).save_pretrained(parent_dir, safe_serialization=True)
    make_tokenizer().save_pretrained(parent_dir)
    raw = tiny_config(tmp_path, parent_dir)
    assert raw["prepare_data"]["seq_len"] > FAMILY_WINDOW  # the window binds in every stage
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["run", str(config)]) == 0, capsys.readouterr().err
    run = tmp_path / "run"
    child = json.loads((run / "children" / "fast" / "config.json").read_text())
    assert child["family"] == family and child["model_type"] == "nemotron-nas"
    windows = [b["attention"].get("window_length") for b in child["block_configs"]]  # each block's own
    assert windows == ([FAMILY_WINDOW] * 4 if family == "mistral" else [None, None, None, FAMILY_WINDOW])
    evaluated = {p.stem for p in (run / "eval").glob("*.json")}
    assert {"parent", "fast", "fast+gkd", "width", "width+gkd"} <= evaluated
    assert json.loads((run / "eval" / "parent.json").read_text())["validation"]["kl"] == 0.0
    # the Minitron baseline is a plain checkpoint of the parent's family
    assert AutoConfig.from_pretrained(RunDir(run).baseline("width")).model_type == family
