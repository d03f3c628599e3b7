"""The distillation loop on tiny models: the loss falls, an interrupted run resumes onto the very same
loss curve, the schedule and data order are what they say, and `puzzle distill` runs end to end."""

import json

import numpy as np
import pytest
import torch
from conftest import make_llama
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from puzzle.distill.commands import distill
from puzzle.distill.trainer import DistillConfig, Distiller, is_checkpointing, lr_at
from puzzle.errors import PuzzleError
from puzzle.model import FFNConfig
from puzzle.model.checkpoint import load_model, save_model, to_puzzle
from puzzle.model.surgery import replace_sublayer
from puzzle.pruning.importance import compute_importance
from puzzle.pruning.prune import PrunePlan, prune_model, save_pruned
from puzzle.training import BatchStream

GEN = torch.Generator().manual_seed(0)
TRAIN = torch.randint(3, 320, (40, 16), generator=GEN)
VAL = torch.randint(3, 320, (6, 16), generator=GEN)
TEACHER = to_puzzle(make_llama())
SCORES = compute_importance(TEACHER, [TRAIN[:8]], progress=False)


def _student():
    """A width- and depth-pruned student (2 of 4 layers, hidden 48, FFN 64) and its pruning record."""
    return prune_model(TEACHER, SCORES, PrunePlan(hidden_size=48, intermediate_size=64, drop_layers=(1, 2)))


def _train_losses(result):
    return [r["loss"] for r in result.history if r["split"] == "train"]


def test_distillation_loss_falls(tmp_path):
    student, record = _student()
    config = DistillConfig(steps=24, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=2, val_every=12,
                           checkpoint_every=24)
    result = Distiller(TEACHER, student, tmp_path, config).train(TRAIN, VAL, progress=False)
    vals = [r for r in result.history if r["split"] == "val"]
    assert [r["step"] for r in vals] == [0, 12, 24]
    assert vals[-1]["kl"] < 0.8 * vals[0]["kl"]
    losses = _train_losses(result)
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    assert result.complete and result.step == 24
    assert (tmp_path / "val_loss.png").stat().st_size > 0


@pytest.mark.parametrize("hidden_loss", ["none", "cosine"])
@pytest.mark.slow
def test_interrupted_run_resumes_onto_the_same_curve(tmp_path, hidden_loss):
    config = DistillConfig(steps=7, batch_size=4, grad_accum=2, lr=2e-3, min_lr=2e-4, warmup_steps=2, val_every=3,
                           checkpoint_every=2, hidden_loss=hidden_loss, lm_weight=0.5)
    student, record = _student()
    kept = dict(kept_layers=record["kept_layers"], kept_channels=record["channels"])
    straight = Distiller(TEACHER, student, tmp_path / "a", config, **kept).train(TRAIN, VAL, progress=False)

    # "crash" after step 5: the last checkpoint is step 4, so step 5 is redone on resume
    student, _ = _student()
    Distiller(TEACHER, student, tmp_path / "b", config, **kept).train(TRAIN, VAL, progress=False, stop_after=5)
    assert len(_train_losses_from(tmp_path / "b")) == 5
    student, _ = _student()  # a fresh process: fresh weights, all state from the checkpoint
    resumed = Distiller(TEACHER, student, tmp_path / "b", config, **kept).train(TRAIN, VAL, progress=False)

    a, b = _train_losses(straight), _train_losses(resumed)
    assert len(a) == len(b) == 7
    assert np.allclose(a, b, rtol=0, atol=1e-6)
    val_a = [r["lm_loss"] for r in straight.history if r["split"] == "val"]
    val_b = [r["lm_loss"] for r in resumed.history if r["split"] == "val"]
    assert np.allclose(val_a, val_b, rtol=0, atol=1e-6) and len(val_a) == 4  # steps 0, 3, 6, 7
    for (n, p), (_, q) in zip(straight.student.named_parameters(), resumed.student.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def _train_losses_from(out):
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "train"]


def test_resume_with_other_settings_is_refused(tmp_path):
    config = DistillConfig(steps=4, batch_size=4, checkpoint_every=2)
    Distiller(TEACHER, _student()[0], tmp_path, config).train(TRAIN, VAL, progress=False, stop_after=2)
    other = DistillConfig(steps=4, batch_size=4, checkpoint_every=2, lr=5e-4)
    with pytest.raises(PuzzleError, match=r"different settings \(lr 0\.0001 -> 0\.0005\)"):
        Distiller(TEACHER, _student()[0], tmp_path, other).train(TRAIN, VAL, progress=False)
    # --no-resume starts over
    result = Distiller(TEACHER, _student()[0], tmp_path, other).train(TRAIN, VAL, progress=False, resume=False)
    assert result.complete


def test_schedule_warms_up_then_decays_to_min():
    c = DistillConfig(steps=100, lr=1e-4, min_lr=1e-5, warmup_steps=10)
    assert lr_at(0, c) == pytest.approx(1e-5) and lr_at(9, c) == pytest.approx(1e-4)
    assert lr_at(10, c) == pytest.approx(1e-4) and lr_at(55, c) == pytest.approx(5.5e-5)
    assert lr_at(100, c) == pytest.approx(1e-5)
    assert all(lr_at(s, c) >= lr_at(s + 1, c) for s in range(10, 99))


def test_micro_batches_are_a_function_of_their_index():
    blocks = np.arange(10 * 2).reshape(10, 2)
    a, b = BatchStream(blocks, 4, seed=3), BatchStream(blocks, 4, seed=3)
    first = [a[i] for i in range(6)]
    assert torch.equal(b[4], first[4]) and torch.equal(b[1], first[1])  # any order of access
    epoch0 = torch.cat([first[0], first[1], first[2][:2]])[:, 0] // 2
    assert sorted(epoch0.tolist()) == list(range(10))  # each epoch covers every block once


def test_bad_settings_fail_clearly():
    with pytest.raises(PuzzleError, match="min-lr"):
        DistillConfig(lr=1e-5, min_lr=1e-4)
    with pytest.raises(PuzzleError, match="nothing to train"):
        DistillConfig(kl_weight=0.0)


def _write_run_dir(run_dir):
    data = run_dir / "data"
    data.mkdir(parents=True)
    TRAIN.numpy().astype(np.uint16).tofile(data / "train.bin")
    VAL.numpy().astype(np.uint16).tofile(data / "val.bin")
    meta = {"dtype": "uint16", "seq_len": 16, "n_train_blocks": len(TRAIN), "n_val_blocks": len(VAL)}
    (data / "meta.json").write_text(json.dumps(meta))


def test_distill_command_on_a_pruned_llama(tmp_path, tiny_parent_dir, tiny_tokenizer, capsys):
    run_dir = tmp_path / "run"
    _write_run_dir(run_dir)
    teacher = to_puzzle(load_model(tiny_parent_dir))
    scores = compute_importance(teacher, [TRAIN[:8]], progress=False)
    pruned, record = prune_model(teacher, scores, PrunePlan(hidden_size=48, drop_layers=(3,)))
    student_dir = save_pruned(pruned, tmp_path / "student", tiny_tokenizer, record)
    kwargs = dict(teacher=tiny_parent_dir, student=student_dir, run_dir=run_dir, steps=4, batch_size=4,
                  val_every=2, checkpoint_every=2, val_blocks=4, hidden_loss="mse")
    model_dir = distill(**kwargs)
    assert model_dir == run_dir / "distill" / "student" / "model"
    loaded = AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(loaded) is LlamaForCausalLM and loaded.config.hidden_size == 48
    assert not torch.equal(loaded.model.embed_tokens.weight, pruned.model.embed_tokens.weight)  # it trained
    result = json.loads((model_dir.parent / "result.json").read_text())
    assert result["complete"] and result["step"] == 4 and result["val"]["val_tokens"] == 64
    assert json.loads((model_dir / "pruning.json").read_text())["kept_layers"] == [0, 1, 2]
    distill(**kwargs)
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(PuzzleError, match="--teacher"):
        distill(student=student_dir, run_dir=run_dir)


def test_distill_command_on_a_heterogeneous_child(tmp_path, tiny_parent_dir, tiny_tokenizer):
    run_dir = tmp_path / "run"
    _write_run_dir(run_dir)
    child = to_puzzle(load_model(tiny_parent_dir))
    replace_sublayer(child, 2, "ffn", FFNConfig(no_op=True))
    save_model(child, tmp_path / "child", tiny_tokenizer)
    out = distill(teacher=tiny_parent_dir, student=tmp_path / "child", run_dir=run_dir, out=tmp_path / "gkd", steps=2,
                  batch_size=4, val_every=1, checkpoint_every=1, val_blocks=2)
    loaded = load_model(out)
    assert loaded.config.model_type == "nemotron-nas" and loaded.model.layers[2].mlp is None


def test_bf16_autocast_with_checkpointing_keeps_fp32_masters_and_a_frozen_bf16_teacher(tmp_path):
    """--dtype bf16 on the CPU: the teacher held once in bf16 without gradients, the student's weights and
    AdamW moments in fp32, its forward under autocast, each decoder layer checkpointed; the loss still falls."""
    from puzzle.device import resolve

    teacher = to_puzzle(make_llama())
    student, _ = prune_model(teacher, SCORES, PrunePlan(hidden_size=48, intermediate_size=64, drop_layers=(1, 2)))
    config = DistillConfig(steps=16, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=2, val_every=16,
                           checkpoint_every=16)
    distiller = Distiller(teacher, student, tmp_path, config, runtime=resolve("cpu", "bf16"), gradient_checkpointing=True)
    assert {p.dtype for p in distiller.teacher.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in distiller.teacher.parameters())
    assert is_checkpointing(distiller.student)
    result = distiller.train(TRAIN, VAL, progress=False)
    assert {p.dtype for p in result.student.parameters()} == {torch.float32}
    moments = [t for s in distiller.optimizer.state.values() for k, t in s.items() if k != "step"]
    assert moments and {t.dtype for t in moments} == {torch.float32}
    vals = [r for r in result.history if r["split"] == "val"]
    assert vals[-1]["kl"] < 0.9 * vals[0]["kl"]
    # the dtype is part of what a resumed run must match: fp32 settings do not resume a bf16 run
    meta = json.loads((tmp_path / "checkpoints" / "step_000016" / "trainer.json").read_text())
    assert meta["config"]["dtype"] == "bf16"
    with pytest.raises(PuzzleError, match="dtype"):
        Distiller(to_puzzle(make_llama()), _student()[0], tmp_path, config).train(TRAIN, VAL, progress=False)
