"""Teacher correction of a hybrid parent (issue 26): a tiny NemotronH (tests/hybrid.py: Mamba2, MoE, attention
and relu2 MLP layers) is fine-tuned by GKD's teacherless loop and saved back as transformers' own NemotronH
class, config unchanged, the trained weights in the class's names and fused experts; resumable as a dense
parent's correction is. An MoE family's trained child goes back into its class's fused experts the same way."""

import copy
import json

import numpy as np
import pytest
import torch
from conftest import make_family_parent
from hybrid import make_nemotron_h_parent
from safetensors.torch import load_file
from test_distill_correct import _losses, _write_run_dir
from transformers import AutoConfig, AutoModelForCausalLM, NemotronHForCausalLM

from puzzle.distill.commands import save_student
from puzzle.distill.correct import correct_teacher
from puzzle.distill.trainer import Distiller
from puzzle.model.checkpoint import load_puzzle, to_puzzle
from puzzle.run_dir import RunDir

# config fields that name the writer, not the architecture
_NOT_ARCHITECTURE = {"transformers_version", "dtype", "torch_dtype", "_name_or_path"}


def _config(path):
    """The config as transformers reads it (config.json may also spell renamed fields by their old names,
    `_config_for_transformers_4`: the same values)."""
    return {k: v for k, v in AutoConfig.from_pretrained(path).to_dict().items() if k not in _NOT_ARCHITECTURE}


@pytest.fixture
def hybrid_parent_dir(tmp_path):
    out = tmp_path / "parent"
    make_nemotron_h_parent().save_pretrained(out, safe_serialization=True)
    return out


@pytest.mark.parametrize("family", ["nemotron_h", "mixtral", "qwen3_moe", "gpt_oss"])
def test_a_trained_parent_is_saved_in_its_own_class_from_its_own_copy(tmp_path, family):
    """The trained child need not share storage with the parent (a child moved to a GPU does not): its weights
    go back through the inverse of `to_puzzle` (a hybrid's mixer names, fused experts) and read back exactly."""
    original = make_nemotron_h_parent() if family == "nemotron_h" else make_family_parent(family)
    trained = to_puzzle(copy.deepcopy(original))  # its own tensors
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = save_student(trained, original, tmp_path / "model", command="correct_teacher")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded) is type(original)
    x = torch.randint(3, 320, (2, 13))
    with torch.no_grad():
        want = trained(x).logits
        assert (loaded(x, use_cache=False).logits - want).abs().max() <= 1e-5
        assert (load_puzzle(out)(x).logits - want).abs().max() <= 1e-5


@pytest.mark.slow
def test_a_hybrid_parent_is_corrected_and_resumes_to_the_same_teacher(tmp_path, hybrid_parent_dir, monkeypatch):
    kwargs = dict(parent=hybrid_parent_dir, steps=6, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=1,
                  val_every=3, checkpoint_every=2, val_blocks=4)
    run_a = _write_run_dir(tmp_path / "a")
    straight = correct_teacher(run_dir=run_a, **kwargs)
    record = json.loads(RunDir(run_a).teacher_record.read_text())
    assert record["complete"] and record["step"] == 6
    assert record["val"]["lm_loss"] < 0.9 * record["val_before"]["lm_loss"]  # it learned the counting sequences
    # transformers' own class, the parent's config but for the weights
    loaded = AutoModelForCausalLM.from_pretrained(straight)
    assert type(loaded) is NemotronHForCausalLM
    assert _config(straight) == _config(hybrid_parent_dir)
    parent_w, corrected_w = load_file(hybrid_parent_dir / "model.safetensors"), load_file(straight / "model.safetensors")
    assert parent_w.keys() == corrected_w.keys()
    changed = [k for k in parent_w if not torch.equal(parent_w[k], corrected_w[k])]
    assert any(".experts." in k for k in changed) and any("mixer.in_proj" in k for k in changed)
    assert RunDir(run_a).info()["parent"] == str(straight.resolve())

    # "crash" after step 3: the last checkpoint is step 2; the resumed run equals the straight one
    train = Distiller.train
    monkeypatch.setattr(Distiller, "train", lambda self, *a, **kw: train(self, *a, stop_after=3, **kw))
    run_b = _write_run_dir(tmp_path / "b")
    correct_teacher(run_dir=run_b, **kwargs)
    assert not json.loads(RunDir(run_b).teacher_record.read_text())["complete"]
    monkeypatch.undo()
    resumed = correct_teacher(run_dir=run_b, **kwargs)
    log = lambda d: [json.loads(line) for line in (d.parent / "log.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = _losses(log(straight)), _losses(log(resumed))
    assert len(a) == len(b) == 6 and np.allclose(a, b, rtol=0, atol=1e-5)
    wb = load_file(resumed / "model.safetensors")
    assert wb.keys() == corrected_w.keys() and all(torch.allclose(corrected_w[k], wb[k], atol=1e-5) for k in wb)
