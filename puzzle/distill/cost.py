"""distill's (GKD's) and correct-teacher's cost models (`puzzle plan`): one trainer (trainer.py), two uses."""

import math
from pathlib import Path
from typing import Any

from puzzle.distill.fsdp import shard_teacher
from puzzle.footprint import DTYPE_BYTES, FP32, Context, Estimate, atomic_save_bytes, placed, unread_bytes
from puzzle.model.checkpoint import load_config
from puzzle.shape import ModelShape

# assumed for GKD's CPU offload: pinned host <-> GPU copies over PCIe Gen4/5 x16 (each direction), and the
# host memory bandwidth a CPU AdamW step streams at (a server's several DDR5 channels, not one core's)
PCIE_BYTES_PER_S = 25e9
HOST_BYTES_PER_S = 50e9


def distill_cost(ctx: Context, s: Any) -> Estimate:
    """distill / GKD (puzzle/distill/commands.py, trainer.py, fsdp.py; `s`: its arguments), the student priced from its config
    when it exists (`student_of`), else bounded by the parent, on `nproc` processes (FSDP2 over nproc
    ranks; one GPU each on CUDA), per rank, e the low dtype:
      teacher   load_model(dtype): P_e (on the CPU less what it never reads, `unread_bytes`), frozen;
                replicated on every rank unless it exceeds TEACHER_REPLICA_FRACTION of a rank's memory
                (`fsdp.shard_teacher`), then P_e / nproc
      student   fp32 master weights + gradient + 2 AdamW moments: 4 x P_fp32, / nproc under FSDP2; a mixed
                single process also holds autocast's e copies of the weights for the step (P_e); FSDP2
                gathers one layer's weights in e at a time (two with prefetch)
      per step  the student's activations of a micro-batch for backward: every layer's op outputs in e, or
                with gradient checkpointing (`gradient_checkpointing`, default on CUDA) each layer's input
                (b x D) plus one layer's op outputs recomputed; the teacher's final hidden states (b x D),
                two (chunk_tokens, V) fp32 logits chunks for the KL; with a hidden loss the teacher's hidden
                states of every layer (L + 1 of b x D)
      checkpoint  every checkpoint_every steps the student and then the 2 AdamW moments are streamed to
                safetensors (`atomic_save_bytes`: nothing from the host, one tensor at a time from a GPU) next
                to everything above but the activations (the freed gradients stay in the process: glibc
                keeps them); under FSDP2 `dcp.save` writes each rank's shard of weights + moments
                (3 x P_fp32 / nproc), staged once
    On CUDA the host holds per rank the baseline + max(the teacher it loads, the checkpoint it writes).
    cpu_offload (FSDP2's CPUOffloadPolicy on the student, any nproc; `offloaded_student`): the student's
    fp32 state moves from the GPU to the host; the GPU keeps the teacher, the units in flight and the
    activations; each step adds its copies and CPU AdamW step (`offload_step_seconds`) to the FLOPs' time.
    Disk: keep_checkpoints checkpoints (weights + 2 moments, fp32) and the final student."""
    shape, T, L, D = ctx.shape, ctx.seq_len, ctx.shape.num_hidden_layers, ctx.shape.hidden_size
    device, dtype = ctx.runtime(s.device, s.dtype)
    e, n = DTYPE_BYTES[dtype], max(1, int(s.nproc))
    offload = bool(s.cpu_offload)
    checkpointing = s.gradient_checkpointing
    checkpointing = device == "cuda" if checkpointing is None else bool(checkpointing)
    b = math.ceil(s.batch_size / n) * T  # the global batch split over the ranks
    Pe = ctx.model_bytes(e)  # the teacher (the parent)
    student_shape = student_of(s.student)  # (shape, blocks) of a student that exists, else None
    P32 = student_shape[0].model_bytes(student_shape[1], FP32) if student_shape else ctx.parent_bytes
    rank_memory = ctx.machine.gpu_bytes if device == "cuda" else ctx.machine.host_bytes / n
    sharded = n > 1 and rank_memory and shard_teacher("auto", Pe, rank_memory)
    teacher = Pe / n if sharded else Pe - unread_bytes(ctx, device, e, logits=True)
    student = 4 * P32 / n
    if n > 1 or offload:
        student += 2 * max(shape.params(b) for b in dict.fromkeys(shape.parent_blocks)) * e
    elif e != FP32:
        student += P32 * e // FP32  # autocast's e copies of the student's weights
    act = training_activations(ctx, b, e, checkpointing)
    act += b * D * e + 2 * s.chunk_tokens * shape.vocab_size * FP32
    if s.hidden_loss != "none":
        act += (L + 1) * b * D * e
    save = atomic_save_bytes(shape, FP32, device) if n == 1 and not offload else 3 * P32 / n  # FSDP2 saves with DCP
    tokens = s.steps * s.grad_accum * s.batch_size * T
    forward = shape.model_flops_per_token(None, T / 2)
    val = math.ceil(s.steps / s.val_every) * s.val_blocks * T * 2 * forward
    est = Estimate("", "distill", disk_bytes=(3 * s.keep_checkpoints + 1) * P32, workers=n, dtype=dtype,
                   flops=tokens * (5 if checkpointing else 4) * forward + val,
                   note=("student: its config" if student_shape else "student <= parent")
                   + (", checkpointed" if checkpointing else "") + (f", FSDP2 x {n}" if n > 1 else "")
                   + (", CPU offload" if offload else ""))
    if device == "cuda" and offload:
        host, gpu = offloaded_student(shape, e, n)
        est.io_seconds = s.steps * offload_step_seconds(P32, n, math.ceil(s.grad_accum / n))
        return placed(est, device, max(P32 + Pe, host), teacher + gpu + act, processes=n)
    if device == "cuda":
        return placed(est, device, max(Pe, save), teacher + student + act, processes=n)
    return placed(est, device, 0, teacher + student + max(act, save), processes=n)


def training_activations(ctx: Context, b: int, e: int, checkpointing: bool) -> int:
    """A parent-sized model's activations kept for backward over b tokens in e: every layer's op outputs, or
    with gradient checkpointing each layer's input (b x D) plus one layer's op outputs being recomputed."""
    L, D = ctx.shape.num_hidden_layers, ctx.shape.hidden_size
    layer = ctx.layer_activation_bytes(b, e)
    return (L * b * D * e + layer) if checkpointing else L * layer


def correct_teacher_cost(ctx: Context, s: Any) -> Estimate:
    """correct-teacher (puzzle/distill/correct.py: trainer.py's loop with no teacher; `s`: its arguments): the
    parent trains on its own LM loss in one process, e the low dtype:
      model     loaded in fp32 (load_model's default), then fp32 master weights + gradient + 2 AdamW
                moments (4 x P_fp32), and autocast's e copies of the weights for the step when e is not fp32
      per step  the activations of a micro-batch (`training_activations`, as GKD's student) and two
                (chunk_tokens, V) fp32 logits chunks of the cross-entropy; no teacher
      checkpoint  as GKD's: the weights, then the 2 moments, streamed to safetensors (`atomic_save_bytes`)
    On CUDA the host holds the baseline + max(the fp32 model it loads, the checkpoint it writes).
    Disk: keep_checkpoints checkpoints (weights + 2 moments, fp32) and the corrected parent (fp32).
    FLOPs: 3 forwards' worth per training token (forward and backward; 4 with gradient checkpointing), and
    one forward per validation token (step 0 and every val_every steps)."""
    shape, T = ctx.shape, ctx.seq_len
    device, dtype = ctx.runtime(s.device, s.dtype)
    e = DTYPE_BYTES[dtype]
    checkpointing = device == "cuda" if s.gradient_checkpointing is None else bool(s.gradient_checkpointing)
    P32 = ctx.parent_bytes
    model = 4 * P32 + (P32 * e // FP32 if e != FP32 else 0)
    act = training_activations(ctx, s.batch_size * T, e, checkpointing) + 2 * s.chunk_tokens * shape.vocab_size * FP32
    save = atomic_save_bytes(shape, FP32, device)
    tokens = s.steps * s.grad_accum * s.batch_size * T
    forward = shape.model_flops_per_token(None, T / 2)
    val = (math.ceil(s.steps / s.val_every) + 1) * s.val_blocks * T * forward
    est = Estimate("", "correct_teacher", disk_bytes=(3 * s.keep_checkpoints + 1) * P32, dtype=dtype,
                   flops=tokens * (4 if checkpointing else 3) * forward + val,
                   note="LM loss, no teacher" + (", checkpointed" if checkpointing else ""))
    if device == "cuda":
        return placed(est, device, max(P32, save), model + act)
    return placed(est, device, 0, model + max(act, save))


def student_of(student: Any) -> tuple[ModelShape, list | None] | None:
    """The shape and blocks (a puzzle child's; None for a plain model) of a GKD student that exists when
    planning (a standalone `puzzle distill --student DIR`, or a pipeline planned again after realize), from
    its config.json alone; None when it does not exist yet (the pipeline plans before realize: the student
    is then bounded by the parent)."""
    if not student or not (Path(student) / "config.json").is_file():
        return None
    config = load_config(student)
    return ModelShape.from_config(config), getattr(config, "blocks", None)


def offloaded_student(shape: ModelShape, e: int, n: int) -> tuple[float, float]:
    """(host, GPU) bytes per rank of a parent-sized student trained by FSDP2 under CPUOffloadPolicy
    (puzzle/distill/fsdp.py `shard`, torch's _fsdp_param.py / _fsdp_collectives.py), e the compute dtype:
      host  the fp32 shards, their gradients and 2 AdamW moments (4 x P_fp32 / n; pinned on CUDA: page-locked,
            so the host must allow it) + the largest tensor `dcp.save` copies while it writes (the padded
            embedding shard: DCP writes host tensors in place and clones only a view of a larger storage)
      GPU   the root unit (embeddings, LM head, final norm), gathered for the whole step (FSDPRoot), and two
            decoder layers (the one computing and the one prefetched), each gathered in e from its fp32 shard
            copied to the GPU (+ 4 / n bytes per parameter); the layers' unsharded gradients in e and their
            fp32 copies for the reduce-scatter, one unit at a time (the root's is the largest)
    Loading (every rank: the student in fp32 and the teacher in e, before sharding and placing) is the caller's."""
    layer = max(shape.params(b) for b in dict.fromkeys(shape.parent_blocks))  # the largest (an MoE parent's differ)
    P32, root = shape.model_bytes(None, FP32), shape.embedding_params + shape.hidden_size
    host = 4 * P32 / n + shape.fixed_params("embeddings") * FP32 / n
    gathered = (root + 2 * layer) * (e + FP32 / n)
    grads = max(root, layer) * (e + FP32)
    return host, gathered + grads


def offload_step_seconds(P32: float, n: int, micro_batches: int) -> float:
    """One optimizer step's offload time per rank (the ranks' copies run in parallel on their own links),
    not overlapped with compute (FSDP2 overlaps some: an upper bound): per micro-batch the rank's fp32 shards
    are copied to the GPU twice (forward and backward gathers) and its reduced gradient shards back
    (3 x P_fp32 / n over PCIe); then AdamW on the CPU reads weights, gradients and 2 moments and writes
    weights and moments (7 x P_fp32 / n of host memory traffic)."""
    return micro_batches * 3 * P32 / n / PCIE_BYTES_PER_S + 7 * P32 / n / HOST_BYTES_PER_S
