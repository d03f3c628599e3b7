"""GKD checkpoints are verified on resume: a bit-flipped or truncated checkpoint is skipped with a one-line
warning and the newest intact earlier one is used (or the run starts over), reaching the uninterrupted
run's result; the resume advice is right for both the CLI and `puzzle run`."""

import json
import logging
import struct

import numpy as np
import pytest
import torch
from conftest import make_llama

from puzzle.distill.trainer import CHECKPOINTS, DistillConfig, Distiller
from puzzle.errors import PuzzleError
from puzzle.model.checkpoint import to_puzzle

GEN = torch.Generator().manual_seed(1)
TRAIN = torch.randint(3, 320, (24, 16), generator=GEN)
VAL = torch.randint(3, 320, (4, 16), generator=GEN)
TEACHER = to_puzzle(make_llama())
CONFIG = DistillConfig(steps=6, batch_size=4, lr=2e-3, min_lr=2e-4, warmup_steps=1, val_every=3,
                       checkpoint_every=2, keep_checkpoints=3)


def _student():
    return to_puzzle(make_llama(seed=1, num_hidden_layers=2))


def _train(out, **kwargs):
    return Distiller(TEACHER, _student(), out, CONFIG).train(TRAIN, VAL, progress=False, **kwargs)


def _flip_exponent_bit(path):
    """Flip the top exponent bit of the first float32 of the first tensor: 0.05 becomes ~1.7e37."""
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    name = next(k for k in sorted(header) if k != "__metadata__" and header[k]["dtype"] == "F32")
    at = 8 + header_len + header[name]["data_offsets"][0] + 3  # little endian: byte 3 = sign + 7 exponent bits
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 100])


def _step_dir(out, step):
    return out / CHECKPOINTS / f"step_{step:06d}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("straight"))


def _assert_same_run(a, b):
    for (name, p), (_, q) in zip(a.student.named_parameters(), b.student.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    assert torch.isfinite(torch.cat([p.flatten() for p in b.student.parameters()])).all()
    losses = lambda r: [x["loss"] for x in r.history if x["split"] == "train"]  # noqa: E731
    assert np.allclose(losses(a), losses(b), rtol=0, atol=1e-6) and len(losses(b)) == CONFIG.steps


@pytest.mark.parametrize("damage", [_flip_exponent_bit, _truncate], ids=["bit-flip", "truncated"])
@pytest.mark.parametrize("file", ["model.safetensors", "optimizer.safetensors"])
@pytest.mark.slow
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, straight, caplog, damage, file):
    _train(tmp_path, stop_after=5)  # checkpoints at steps 2 and 4
    damage(_step_dir(tmp_path, 4) / file)
    with caplog.at_level(logging.WARNING, logger="puzzle.distill.trainer"):
        resumed = _train(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "step_000004" in warnings[0] and file in warnings[0] and "step_000002" in warnings[0]
    assert resumed.complete
    _assert_same_run(straight, resumed)


def test_no_intact_checkpoint_starts_over(tmp_path, straight, caplog):
    _train(tmp_path, stop_after=5)
    _truncate(_step_dir(tmp_path, 2) / "model.safetensors")
    _flip_exponent_bit(_step_dir(tmp_path, 4) / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="puzzle.distill.trainer"):
        resumed = _train(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "start" in warnings[-1]
    _assert_same_run(straight, resumed)


def test_a_checkpoint_whose_trainer_json_lost_its_file_records_is_not_trusted(tmp_path, straight, caplog):
    """A damaged checkpoint with its hashes removed from trainer.json (it was loaded unverified before) is skipped
    like any damaged one: every checkpoint we write records them."""
    _train(tmp_path, stop_after=5)
    _flip_exponent_bit(_step_dir(tmp_path, 4) / "model.safetensors")
    meta_path = _step_dir(tmp_path, 4) / "trainer.json"
    meta = json.loads(meta_path.read_text())
    del meta["files"]
    meta_path.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="puzzle.distill.trainer"):
        resumed = _train(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "step_000004" in warnings[0] and "no file hashes" in warnings[0]
    _assert_same_run(straight, resumed)


def test_resume_advice_names_the_flag_and_the_config_key(tmp_path):
    _train(tmp_path, stop_after=2)
    other = DistillConfig(**{**CONFIG.to_json(), "betas": CONFIG.betas, "layer_map": None, "lr": 1e-3})
    with pytest.raises(PuzzleError) as err:
        Distiller(TEACHER, _student(), tmp_path, other).train(TRAIN, VAL, progress=False)
    assert "--no-resume" in str(err.value) and "resume: false" in str(err.value)
