"""FSDP2 GKD on 2 CPU processes (gloo) is one-process GKD: the same losses and weights after N steps, a
stopped run resumes from its sharded checkpoint onto the uninterrupted curve, a damaged shard is refused,
and `puzzle distill --nproc 2` saves a child that loads like one-process GKD's. The same holds under CPU
offload (FSDP2's CPUOffloadPolicy), on 2 ranks and on one rank in this process (`--cpu-offload`).

Tolerance (fp32): two ranks reduce-scatter the sum of two micro-batch gradients that one process
accumulates in order, and the clipping norm is a sum of per-shard norms: the same maths with sums in
another order, a few float32 ulps per step. AdamW divides by sqrt(v), so those differences stay at
rounding level rather than growing with the step count. TOL = 1e-5 on per-token losses of order 1-5 and
on weights (measured after 6 steps: 2.4e-7 on the loss, 1.5e-6 on a weight; float32 epsilon is 1.2e-7),
while a wrong gradient scale (not multiplying by the rank count) fails it: the grad norm halves. Resuming
the 2-process run repeats the same reductions, so it matches the uninterrupted 2-process run to 1e-6, as
one-process resume does.

CPU offload on this CPU-only torch: FSDP2 takes CPUOffloadPolicy with a CPU mesh and runs its offload path
(shards marked offloaded, gradients "moved" to the host, the optimizer stepping host shards), but host and
device are the same memory, so these tests show the option is carried to fully_shard and changes no number,
and that its checkpoints resume; the GPU memory it saves is priced by `puzzle plan`, not measured here.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fsdp_worker import CONFIG, STOP, case, tied_case
from safetensors.torch import load_file

from puzzle.distill.fsdp import _flags, check_world, shard_teacher
from puzzle.distill.trainer import DistillConfig, Distiller
from puzzle.errors import PuzzleError

WORKER = Path(__file__).with_name("fsdp_worker.py")
TOL = 1e-5


def _torchrun(*args: str, timeout: int = 1200) -> str:
    """Its output (stdout + stderr) once the 2 workers succeeded."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _log(out: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["split"] == split]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    output = _torchrun(str(WORKER), str(out))
    single = {}
    for name, make in (("single", case), ("tied", tied_case)):
        teacher, student, kept, train, val = make()
        single[name] = Distiller(teacher, student, out / f"{name}-single", CONFIG, **kept).train(
            train, val, progress=False)
    return out, single, output


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", ["straight", "sharded", "tied", "offload"])
@pytest.mark.slow
def test_two_processes_match_one(runs, name):
    out, singles, _ = runs
    single = singles["tied" if name == "tied" else "single"]
    one = [r for r in single.history if r["split"] == "train"]
    two = _log(out / name, "train")
    assert [r["step"] for r in two] == list(range(1, CONFIG.steps + 1))
    for key in ("loss", "kl", "lm_loss", "hidden", "grad_norm"):
        assert np.allclose([r[key] for r in one], [r[key] for r in two], rtol=0, atol=TOL), key
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]  # the same global batch
    vals = _log(out / name, "val")
    assert [r["step"] for r in vals] == [0, 3, 6]
    assert np.allclose([r["kl"] for r in vals], [r["kl"] for r in single.history if r["split"] == "val"], atol=TOL)
    weights = load_file(out / name / "final.safetensors")  # gathered to rank 0, a plain module's state dict
    mine = single.student.state_dict()
    assert sorted(weights) == sorted(mine)
    for key, value in mine.items():
        assert torch.allclose(weights[key], value, rtol=0, atol=TOL), key
    start = (tied_case if name == "tied" else case)()[1].state_dict()["model.embed_tokens.weight"]
    assert not torch.equal(weights["model.embed_tokens.weight"], start)  # it trained


@pytest.mark.timeout(1800)
@pytest.mark.slow
def test_bf16_compute_keeps_fp32_masters_and_the_fp32_curve(runs):
    """bf16 has 8 mantissa bits (relative rounding 2^-9 = 2e-3): the curve follows fp32's to about that,
    and differs from it (bf16 was in effect); the trained shards, so the saved weights, stay fp32."""
    out, _, _ = runs
    fp32, bf16 = _log(out / "sharded", "train"), _log(out / "bf16", "train")
    gaps = np.abs(np.array([r["loss"] for r in fp32]) - [r["loss"] for r in bf16])
    assert gaps.max() < 2e-2 and gaps.max() > TOL
    assert {v.dtype for v in load_file(out / "bf16" / "final.safetensors").values()} == {torch.float32}


@pytest.mark.timeout(1800)
@pytest.mark.slow
def test_a_stopped_run_resumes_from_its_sharded_checkpoint(runs):
    out, _, _ = runs
    straight, resumed = _log(out / "straight", "train"), _log(out / "resumed", "train")
    assert len(resumed) == CONFIG.steps  # steps past the checkpoint were dropped and recomputed, once
    stopped = [json.loads(line) for line in (out / "stopped.jsonl").read_text().splitlines()]
    kept = STOP - STOP % CONFIG.checkpoint_every
    assert [r for r in stopped if r["split"] == "train"][kept:] != resumed[kept:STOP]  # recomputed: new timings
    assert [r for r in stopped if r["split"] == "train" and r["step"] <= kept] == resumed[:kept]  # resumed, not restarted
    assert np.allclose([r["loss"] for r in straight], [r["loss"] for r in resumed], rtol=0, atol=1e-6)
    a, b = load_file(out / "straight" / "final.safetensors"), load_file(out / "resumed" / "final.safetensors")
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), key
    checkpoint = out / "resumed" / "checkpoints" / f"step_{CONFIG.steps:06d}"
    meta = json.loads((checkpoint / "trainer.json").read_text())
    assert meta["world_size"] == 2 and meta["micro_batch"] == CONFIG.steps * CONFIG.grad_accum
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "rng_0.safetensors", "rng_1.safetensors"} <= set(meta["files"])
    assert STOP % CONFIG.checkpoint_every  # the stop fell between checkpoints: work was redone


@pytest.mark.timeout(1800)
@pytest.mark.slow
def test_an_offloaded_run_resumes_from_its_checkpoint(runs):
    out, _, _ = runs
    straight, resumed = _log(out / "straight", "train"), _log(out / "offload-resumed", "train")
    assert len(resumed) == CONFIG.steps
    assert np.allclose([r["loss"] for r in straight], [r["loss"] for r in resumed], rtol=0, atol=1e-6)
    a, b = load_file(out / "straight" / "final.safetensors"), load_file(out / "offload-resumed" / "final.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


@pytest.mark.timeout(1800)
@pytest.mark.slow
def test_a_damaged_shard_falls_back_to_the_previous_checkpoint(runs):
    out, _, output = runs
    last = f"step_{CONFIG.steps:06d}"
    assert output.count(f"{last} skipped: __1_0.distcp does not match its recorded sha256") == 1  # rank 0 speaks
    assert f"resuming from step_{CONFIG.steps - CONFIG.checkpoint_every:06d}" in output
    straight, damaged = _log(out / "straight", "train"), _log(out / "damaged", "train")
    assert np.allclose([r["loss"] for r in straight], [r["loss"] for r in damaged], rtol=0, atol=1e-6)
    assert len(damaged) == CONFIG.steps
    a, b = load_file(out / "straight" / "final.safetensors"), load_file(out / "damaged" / "final.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("cpu_offload", [False, True])
@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_on_one_rank(runs, tmp_path, monkeypatch, cpu_offload):
    """DCP reshards on load: the 2-rank run's step-4 checkpoint, resumed by a 1-rank FSDP job (this
    process), with or without CPU offload, reaches the 2-rank run's losses and weights."""
    import torch.distributed as dist
    from fsdp_worker import run

    out, _, _ = runs
    shutil.copytree(out / "straight", tmp_path / "one")
    last = tmp_path / "one" / "checkpoints" / f"step_{CONFIG.steps:06d}"
    shutil.rmtree(last)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0", LOCAL_WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)
    try:
        run(tmp_path / "one", teacher_sharding="replicate", cpu_offload=cpu_offload)
    finally:
        dist.destroy_process_group()
    two, one = _log(out / "straight", "train"), _log(tmp_path / "one", "train")
    assert np.allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=0, atol=TOL) and len(one) == CONFIG.steps
    a, b = load_file(out / "straight" / "final.safetensors"), load_file(tmp_path / "one" / "final.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=TOL) for k in a)
    assert json.loads((last / "trainer.json").read_text())["world_size"] == 1
    resumed_from = CONFIG.steps - CONFIG.checkpoint_every  # kept, and its steps not recomputed (same timings)
    assert (last.parent / f"step_{resumed_from:06d}").exists()
    assert [r for r in one if r["step"] <= resumed_from] == [r for r in two if r["step"] <= resumed_from]


def test_settings_that_cannot_split_fail_in_one_line():
    with pytest.raises(PuzzleError, match="grad-accum .1. must be a multiple of the process count .2."):
        check_world(DistillConfig(grad_accum=1), 2)
    check_world(CONFIG, 2)
    assert shard_teacher("auto", 300, 1000) and not shard_teacher("auto", 200, 1000)
    assert shard_teacher("shard", 1, 1000) and not shard_teacher("replicate", 10**6, 1)
    assert _flags({"steps": 3, "resume": False, "out": None, "teacher": Path("t")}) == [
        "--steps", "3", "--no-resume", "--teacher", "t"]


def test_cpu_offload_reaches_fully_shard(tmp_path):
    """--cpu-offload: every student unit's parameters under CPUOffloadPolicy (pinned only for a GPU), the
    teacher's not; without it, none."""
    import torch.distributed as dist

    from puzzle.distill.fsdp import FSDPDistiller, offload_policy, one_process

    def units(model):
        return [m for m in model.modules() if hasattr(m, "_get_fsdp_state")]

    assert offload_policy(True, torch.device("cuda")).pin_memory
    assert not offload_policy(True, torch.device("cpu")).pin_memory
    for cpu_offload in (False, True):
        teacher, student, kept, _, _ = case()
        with one_process(torch.device("cpu")):
            d = FSDPDistiller(teacher, student, tmp_path, CONFIG, **kept, teacher_sharding="shard",
                              cpu_offload=cpu_offload)
            params = [p for m in units(d.root) for p in m._get_fsdp_state()._fsdp_param_group.fsdp_params]
            teacher_params = [p for m in units(d.teacher_root) for p in m._get_fsdp_state()._fsdp_param_group.fsdp_params]
        assert not dist.is_initialized()  # one_process cleans up
        assert len(params) == len(list(student.parameters())) + len(list(d.projection.parameters()))
        assert {(p.offload_to_cpu, p.pin_memory) for p in params} == {(cpu_offload, False)}
        assert not any(p.offload_to_cpu for p in teacher_params)


def _write_run_dir(run_dir: Path, train: torch.Tensor, val: torch.Tensor) -> None:
    data = run_dir / "data"
    data.mkdir(parents=True)
    train.numpy().astype(np.uint16).tofile(data / "train.bin")
    val.numpy().astype(np.uint16).tofile(data / "val.bin")
    meta = {"dtype": "uint16", "seq_len": train.shape[1], "n_train_blocks": len(train), "n_val_blocks": len(val)}
    (data / "meta.json").write_text(json.dumps(meta))


@pytest.mark.timeout(1800)
@pytest.mark.slow
def test_distill_nproc_2_saves_the_child_one_process_saves(tmp_path, tiny_parent_dir, tiny_tokenizer, capsys,
                                                            monkeypatch):
    """`puzzle distill --nproc 2` (torchrun under the hood) on a heterogeneous child: the gathered child is
    saved by rank 0 in the child format and equals the one-process child; a rerun has nothing to do; a
    user error in the workers ends the launcher in that one line."""
    from puzzle.distill.commands import distill
    from puzzle.model import FFNConfig
    from puzzle.model.checkpoint import load_model, save_model, to_puzzle
    from puzzle.model.surgery import replace_sublayer

    _, _, _, train, val = case()
    run_dir = tmp_path / "run"
    _write_run_dir(run_dir, train, val)
    child = to_puzzle(load_model(tiny_parent_dir))
    replace_sublayer(child, 2, "ffn", FFNConfig(no_op=True))
    save_model(child, tmp_path / "child", tiny_tokenizer)
    kwargs = dict(teacher=tiny_parent_dir, student=tmp_path / "child", run_dir=run_dir, steps=3, batch_size=4,
                  grad_accum=2, val_every=2, checkpoint_every=2, val_blocks=4)
    two = distill(**kwargs, out=tmp_path / "two", nproc=2)
    one = distill(**kwargs, out=tmp_path / "one")
    assert two == tmp_path / "two" / "model"
    a, b = load_model(one), load_model(two)
    assert b.config.model_type == "nemotron-nas" and b.model.layers[2].mlp is None
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=TOL), name
    assert not torch.equal(b.model.embed_tokens.weight, child.model.embed_tokens.weight)  # it trained
    result = json.loads((tmp_path / "two" / "result.json").read_text())
    assert result["complete"] and result["step"] == 3
    world = lambda out: json.loads((out / "checkpoints" / "step_000003" / "trainer.json").read_text())["world_size"]
    assert world(tmp_path / "two") == 2  # the workers joined one job
    capsys.readouterr()
    distill(**kwargs, out=tmp_path / "two", nproc=2)
    assert "nothing to do" in capsys.readouterr().out
    # --cpu-offload on one rank: FSDP2 in this process (no torchrun), the one-process child again
    offloaded = distill(**kwargs, out=tmp_path / "offload", cpu_offload=True)
    for (name, p), (_, q) in zip(a.named_parameters(), load_model(offloaded).named_parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=TOL), name
    assert (tmp_path / "offload" / "checkpoints" / "step_000003" / ".metadata").exists()  # DCP, as FSDP2 writes
    assert world(tmp_path / "offload") == 1
    # a worker's user error is the launcher's one line (here: resuming under another lr, found by the workers)
    with pytest.raises(PuzzleError, match=r"different settings \(lr 0.0001 -> 0.0002\); pass --no-resume"):
        distill(**{**kwargs, "lr": 2e-4}, out=tmp_path / "two", nproc=2)
    # offloading from a GPU to the host needs the GPU: asked for on the CPU where one is visible, one line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(PuzzleError, match="--cpu-offload offloads from a GPU: it needs --device cuda"):
        distill(**kwargs, out=tmp_path / "cpu", cpu_offload=True, device="cpu")
