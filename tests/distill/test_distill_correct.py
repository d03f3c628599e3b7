"""Teacher correction (`puzzle correct-teacher`): GKD's loop with no teacher trains the parent's own LM loss,
resumes onto the uninterrupted result, and makes the corrected parent the run's parent, which every stage
that takes a parent then holds to; user mistakes are one line."""

import json

import numpy as np
import pytest
import torch
from conftest import make_llama
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from puzzle.cli import main
from puzzle.distill.commands import distill
from puzzle.distill.correct import correct_teacher
from puzzle.distill.trainer import DistillConfig, Distiller
from puzzle.errors import PuzzleError
from puzzle.evaluate.commands import evaluate
from puzzle.model.fingerprint import fingerprint
from puzzle.pruning.commands import importance
from puzzle.run_dir import RunDir
from puzzle.search_space import resolve_run_info


def _sequences(n: int, length: int, seed: int) -> torch.Tensor:
    """(n, length) ids with structure a model can learn in a few steps: 31 of the 320 ids (3..33), each row
    counting up by its own stride modulo 31 from a random start."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 31, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    return 3 + (start + stride * torch.arange(length)) % 31


TRAIN, VAL = _sequences(48, 16, 0), _sequences(8, 16, 1)
LM_ONLY = dict(kl_weight=0.0, lm_weight=1.0)


def _write_run_dir(run_dir):
    data = run_dir / "data"
    data.mkdir(parents=True)
    TRAIN.numpy().astype(np.uint16).tofile(data / "train.bin")
    VAL.numpy().astype(np.uint16).tofile(data / "val.bin")
    meta = {"dtype": "uint16", "seq_len": 16, "n_train_blocks": len(TRAIN), "n_val_blocks": len(VAL),
            "fingerprint": "tiny-data"}
    (data / "meta.json").write_text(json.dumps(meta))
    return run_dir


def _losses(history, split="train", key="loss"):
    return [r[key] for r in history if r["split"] == split]


def test_lm_loss_falls_without_a_teacher(tmp_path):
    config = DistillConfig(steps=16, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=2, val_every=8,
                           checkpoint_every=16, **LM_ONLY)
    result = Distiller(None, make_llama(), tmp_path, config).train(TRAIN, VAL, progress=False)
    vals = [r for r in result.history if r["split"] == "val"]
    assert [r["step"] for r in vals] == [0, 8, 16]
    assert vals[-1]["lm_loss"] < 0.8 * vals[0]["lm_loss"]
    assert all("kl" not in r and "top1_agreement" not in r for r in result.history)  # no teacher to compare with
    losses = _losses(result.history)
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    assert (tmp_path / "val_loss.png").stat().st_size > 0


def test_a_teacherless_run_trains_only_the_lm_loss():
    with pytest.raises(ValueError, match="only the LM loss"):
        Distiller(None, make_llama(), "unused", DistillConfig())  # kl_weight 1: a teacher is needed


def test_correction_becomes_the_runs_parent_and_stages_hold_to_it(tmp_path, tiny_parent_dir, capsys):
    run_dir = _write_run_dir(tmp_path / "run")
    kwargs = dict(parent=tiny_parent_dir, run_dir=run_dir, steps=4, batch_size=4, lr=3e-3, warmup_steps=1,
                  val_every=2, checkpoint_every=2, val_blocks=4)
    model_dir = correct_teacher(**kwargs)
    run = RunDir(run_dir)
    assert model_dir == run.teacher_model
    loaded = AutoModelForCausalLM.from_pretrained(model_dir)  # a plain Llama stays a plain Llama
    original = AutoModelForCausalLM.from_pretrained(tiny_parent_dir)
    assert type(loaded) is LlamaForCausalLM
    assert not torch.equal(loaded.model.embed_tokens.weight, original.model.embed_tokens.weight)  # it trained
    assert (model_dir / "tokenizer.json").exists()
    record = json.loads(run.teacher_record.read_text())
    assert record["parent"] == str(tiny_parent_dir.resolve()) and record["complete"] and record["step"] == 4
    assert record["tokens"] == 4 * 4 * 16 and record["sources"]["parent_fingerprint"] == fingerprint(tiny_parent_dir)
    assert record["sources"]["data"] == "tiny-data"
    assert record["val"]["lm_loss"] < record["val_before"]["lm_loss"]
    info = run.info()
    assert info["parent"] == str(model_dir.resolve()) and info["parent_fingerprint"] == fingerprint(model_dir)
    assert info["parent_original"] == str(tiny_parent_dir.resolve())

    correct_teacher(**kwargs)
    assert "nothing to do" in capsys.readouterr().out
    correct_teacher(run_dir=run_dir, **{k: v for k, v in kwargs.items() if k not in ("parent", "run_dir")})
    assert "nothing to do" in capsys.readouterr().out  # the run's original parent, read back

    # every stage that takes a parent holds to the corrected one; the original is named as such
    corrected = "parent was corrected by puzzle correct-teacher"
    with pytest.raises(PuzzleError, match=corrected):
        importance(parent=tiny_parent_dir, run_dir=run_dir)
    with pytest.raises(PuzzleError, match=corrected):
        resolve_run_info(run_dir, tiny_parent_dir)
    with pytest.raises(PuzzleError, match=corrected):
        evaluate(model=model_dir, parent=tiny_parent_dir, run_dir=run_dir)
    with pytest.raises(PuzzleError, match=f"{corrected}.*--teacher"):
        distill(teacher=tiny_parent_dir, student=tiny_parent_dir, run_dir=run_dir)
    assert resolve_run_info(run_dir)["parent"] == str(model_dir.resolve())
    result = evaluate(model=tiny_parent_dir, run_dir=run_dir, name="parent_original", measure=False, budget=None,
                      val_blocks=4)
    assert result["parent"] == str(model_dir.resolve()) and result["validation"]["kl"] > 0  # against the corrected one


def test_an_interrupted_correction_resumes_to_the_same_teacher(tmp_path, tiny_parent_dir, monkeypatch):
    kwargs = dict(parent=tiny_parent_dir, steps=5, batch_size=4, grad_accum=2, lr=2e-3, min_lr=2e-4,
                  warmup_steps=1, val_every=2, checkpoint_every=2, val_blocks=4)
    straight = correct_teacher(run_dir=_write_run_dir(tmp_path / "a"), **kwargs)

    # "crash" after step 3: the last checkpoint is step 2, so step 3 is redone on resume
    train = Distiller.train
    monkeypatch.setattr(Distiller, "train", lambda self, *a, **kw: train(self, *a, stop_after=3, **kw))
    run_b = _write_run_dir(tmp_path / "b")
    correct_teacher(run_dir=run_b, **kwargs)
    assert not json.loads(RunDir(run_b).teacher_record.read_text())["complete"]
    assert "parent" not in RunDir(run_b).info()  # an unfinished correction is not the run's parent
    monkeypatch.undo()
    resumed = correct_teacher(run_dir=run_b, **kwargs)

    log = lambda d: [json.loads(line) for line in (d.parent / "log.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = _losses(log(straight)), _losses(log(resumed))
    assert len(a) == len(b) == 5 and np.allclose(a, b, rtol=0, atol=1e-6)
    wa, wb = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    assert json.loads(RunDir(run_b).teacher_record.read_text())["complete"]


def test_mistakes_are_one_line(tmp_path, tiny_parent_dir, tiny_llama, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PuzzleError, match="no prepared data"):
        correct_teacher(parent=tiny_parent_dir, run_dir=empty)
    with pytest.raises(PuzzleError, match="pass --parent"):
        correct_teacher(run_dir=empty)
    with pytest.raises(PuzzleError, match="--run-dir is required"):
        correct_teacher(parent=tiny_parent_dir)
    assert main(["correct-teacher", "--parent", str(tiny_parent_dir), "--run-dir", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no prepared data" in err and len(err.splitlines()) == 1

    run_dir = _write_run_dir(tmp_path / "run")
    other = tmp_path / "other"
    tiny_llama.save_pretrained(other)
    RunDir(run_dir).info_file.write_text(json.dumps({"parent": str(other.resolve())}))
    with pytest.raises(PuzzleError, match="belongs to parent"):
        correct_teacher(parent=tiny_parent_dir, run_dir=run_dir)
    RunDir(run_dir).info_file.unlink()

    # R/teacher holding a correction (begun) from another parent: refused unless --force
    teacher = RunDir(run_dir).teacher
    teacher.mkdir()
    (teacher / ".puzzle-output.json").write_text(json.dumps({"command": "correct_teacher"}))
    (teacher / "sources.json").write_text(json.dumps({"parent": str(other.resolve())}))
    with pytest.raises(PuzzleError, match="corrected from another parent.*--force"):
        correct_teacher(parent=tiny_parent_dir, run_dir=run_dir, steps=1)
    model_dir = correct_teacher(parent=tiny_parent_dir, run_dir=run_dir, steps=1, val_blocks=2, force=True)
    with pytest.raises(PuzzleError, match="is this run's corrected teacher"):
        correct_teacher(parent=model_dir, run_dir=run_dir)
    with pytest.raises(PuzzleError, match="teacher was corrected from"):
        correct_teacher(parent=other, run_dir=run_dir)
    # the run's own area: no other command writes there
    from puzzle.outputs import check_output

    with pytest.raises(PuzzleError, match="inside the run's own teacher"):
        check_output(teacher / "x", "realize", run_dir=run_dir)


def test_the_correction_is_priced_as_gkd_of_the_parent_without_a_teacher():
    """`puzzle plan`'s model: the same trainer, so the same student state and activations as GKD of a
    parent-sized student, less the frozen teacher's weights and its forward per training token."""
    from conftest import make_llama_config

    from puzzle.footprint import PROCESS_BASELINE_BYTES, Context, Machine
    from puzzle.search_space import load_search_space
    from puzzle.shape import ModelShape
    from puzzle.stages import BY_NAME

    config = make_llama_config(vocab_size=32000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                               num_attention_heads=8, num_key_value_heads=2)
    cpu = Machine("cpu", 0, host_bytes=0, gpu_bytes=0, cpu_flops=1, gpu_flops=0, throughput_note="")
    shape = ModelShape.from_config(config)
    ctx = Context(config, shape, load_search_space("tiny", config), 256, 0, cpu)
    settings = {"steps": 10, "batch_size": 4, "device": "cpu"}
    correct = BY_NAME["correct_teacher"].estimate(ctx, settings)
    gkd = BY_NAME["distill"].estimate(ctx, settings)
    assert correct.host_bytes >= 4 * ctx.parent_bytes + PROCESS_BASELINE_BYTES  # fp32 weights, gradient, 2 moments
    assert gkd.host_bytes - correct.host_bytes > ctx.parent_bytes / 2  # the teacher GKD holds (less its unread embedding)
    tokens = 10 * 4 * 256
    assert gkd.flops - correct.flops == pytest.approx(tokens * shape.model_flops_per_token(None, 256 / 2))
    assert correct.disk_bytes == gkd.disk_bytes  # the same checkpoints and one model of the parent's size


def test_a_converted_parent_is_corrected_into_a_child(tmp_path, tiny_parent_dir):
    """The pipeline's converted parent (an all-parent puzzle child, R/parent) stays a child: its format is kept."""
    from puzzle.model.checkpoint import load_model
    from puzzle.model.convert import convert

    run_dir = _write_run_dir(tmp_path / "run")
    converted = convert(tiny_parent_dir, run_dir / "parent")
    model_dir = correct_teacher(parent=converted, run_dir=run_dir, steps=1, val_blocks=2)
    corrected = load_model(model_dir)
    assert corrected.config.model_type == "nemotron-nas" and len(corrected.config.block_configs) == 4
    assert RunDir(run_dir).info()["parent_original"] == str(converted.resolve())
