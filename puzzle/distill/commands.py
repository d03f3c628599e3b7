"""`puzzle distill`: knowledge distillation of a student checkpoint from a teacher on a run's data."""

from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import torch

from puzzle.errors import PuzzleError
from puzzle.io import atomic_write_json, read_json
from puzzle.model import PuzzleForCausalLM
from puzzle.model.checkpoint import class_state, load_model, load_tokenizer, save_checkpoint, save_model
from puzzle.outputs import check_output, marker, write_marker
from puzzle.run_dir import PRUNING_FILE, RunDir, writes_run_dir
from puzzle.stages import settings_of

from . import fsdp
from .losses import parse_layer_map
from .trainer import DistillConfig, Distiller

RESULT_FILE = "result.json"
SOURCES_FILE = "sources.json"  # the teacher's and the student's content fingerprints the run was trained from


def _sources(teacher: Path, student: Path) -> dict[str, str]:
    from puzzle.model.fingerprint import fingerprint

    return {"teacher_fingerprint": fingerprint(teacher), "student_fingerprint": fingerprint(student)}


def _trained_from_others(out: Path, sources: dict[str, str]) -> bool:
    """Whether `out` holds a run recorded as trained from other teacher or student content (a run written
    before sources were recorded is taken as this one's)."""
    path = out / SOURCES_FILE
    return path.exists() and read_json(path) != sources


def _student_record(student: Path) -> dict:
    path = RunDir.pruning_record(student)
    return read_json(path) if path.exists() else {}


def save_student(trained: PuzzleForCausalLM, original: torch.nn.Module, out: Path, tokenizer=None,
                 record: dict | None = None, command: str = "distill") -> Path:
    """Save in the student's own format: a plain Llama stays a plain Llama (no custom code needed),
    a puzzle child stays a puzzle child; marked as `command`'s output (puzzle.outputs)."""
    extra = {**marker(command), **({PRUNING_FILE: record} if record else {})}
    if isinstance(original, PuzzleForCausalLM):
        return save_model(trained, out, tokenizer, extra_json=extra)
    # back into the original's class (a NemotronH's mixer names and fused experts, an MoE family's fused
    # experts): every one of its weights, or a bug
    missing, _ = original.load_state_dict(class_state(trained, original), strict=False)
    tied = getattr(original.config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight") and "rotary_emb" not in k]
    if missing:
        raise RuntimeError(f"trained weights do not map onto {type(original).__name__}: {missing[:3]}")
    return save_checkpoint(original, out, tokenizer, extra_json=extra)


@writes_run_dir("distill")
def distill(
    teacher: Path | None = None,
    student: Path | None = None,
    run_dir: Path | None = None,
    out: Path | None = None,
    steps: int = DistillConfig.steps,
    batch_size: int = DistillConfig.batch_size,
    grad_accum: int = DistillConfig.grad_accum,
    lr: float = DistillConfig.lr,
    min_lr: float = DistillConfig.min_lr,
    warmup_steps: int = DistillConfig.warmup_steps,
    weight_decay: float = DistillConfig.weight_decay,
    temperature: float = DistillConfig.temperature,
    kl_weight: float = DistillConfig.kl_weight,
    lm_weight: float = DistillConfig.lm_weight,
    hidden_loss: Literal["none", "cosine", "mse"] = DistillConfig.hidden_loss,
    hidden_weight: float = DistillConfig.hidden_weight,
    layer_map: str | None = DistillConfig.layer_map,
    val_every: int = DistillConfig.val_every,
    val_blocks: int = 32,
    checkpoint_every: int = DistillConfig.checkpoint_every,
    keep_checkpoints: int = DistillConfig.keep_checkpoints,
    chunk_tokens: int = DistillConfig.chunk_tokens,
    seed: int = DistillConfig.seed,
    resume: bool = True,
    threads: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    gradient_checkpointing: bool | None = None,
    nproc: int = 1,
    cpu_offload: bool = False,
    force: bool = False,
) -> Path:
    """Distil a student from a teacher on the run's prepared data (forward KL on logits, optional hidden-state loss).

    Args:
        teacher: the teacher model (HF dir, safetensors or GGUF), usually the parent
        student: the student checkpoint (a pruned Llama or a puzzle child)
        run_dir: run directory whose data/ (from prepare-data) is trained and validated on
        out: output directory (default RUN_DIR/distill/<student name>); the trained model goes to OUT/model
        steps: optimizer steps
        batch_size: sequences per micro-batch
        grad_accum: micro-batches per optimizer step
        lr: peak learning rate (after linear warm-up)
        min_lr: learning rate at the end of the cosine decay
        warmup_steps: linear warm-up steps
        weight_decay: AdamW weight decay on matrices
        temperature: softmax temperature of the KL (scaled by T^2)
        kl_weight: weight of the forward KL to the teacher's logits
        lm_weight: weight of the student's own LM loss (off by default)
        hidden_loss: loss between mapped hidden states (a learned projection when widths differ)
        hidden_weight: weight of the hidden-state loss
        layer_map: STUDENT:TEACHER hidden-state indices, e.g. 1:2,2:4 (0 = embeddings); default from
            the student's pruning.json or proportional
        val_every: validate every this many steps
        val_blocks: validation blocks used (the first ones of the val split)
        checkpoint_every: checkpoint every this many steps
        keep_checkpoints: checkpoints kept in OUT (the newest; older ones are removed as new ones are written)
        chunk_tokens: tokens whose logits are alive at once in the KL (bounds memory)
        seed: data order seed
        resume: continue from OUT's last checkpoint (--no-resume starts over, discarding it)
        threads: torch CPU threads
        device: auto (CUDA when a GPU is visible, else the CPU), cpu, cuda or cuda:N
        dtype: the teacher's dtype and the student's autocast dtype (its weights and AdamW state stay fp32):
            auto (bf16 on CUDA, fp32 on the CPU), bf16, fp16 or fp32
        gradient_checkpointing: recompute each student decoder layer in the backward instead of keeping its
            activations (default: on for CUDA, off on the CPU)
        nproc: processes (one GPU each on CUDA) to train on with FSDP2, the same global batch; above 1
            launches torchrun on this node (grad-accum must be a multiple). Under torchrun the job's size is used
        cpu_offload: keep the student's fp32 weights, gradients and AdamW moments in host memory (FSDP2's
            CPUOffloadPolicy; the optimizer steps on the CPU), streaming each layer to the device for its
            forward and backward: a student too large for the GPU trains on it. Any nproc (1 runs FSDP2 in
            this process); needs host memory for 16 bytes per student parameter (/ nproc per process)
        force: replace an earlier output of another puzzle command at OUT (never anything else)
    """
    arguments = dict(locals())  # this call, for torchrun's workers
    from puzzle.data.blocks import check_token_ids, load_blocks
    from puzzle.device import resolve

    for name, value in (("--teacher", teacher), ("--student", student), ("--run-dir", run_dir)):
        if value is None:
            raise PuzzleError(f"{name} is required")
    teacher, student, run_dir = Path(teacher), Path(student), Path(run_dir)
    RunDir(run_dir).check_parent(teacher, "--teacher", corrected_only=True)  # teacher correction: the corrected one
    runtime = resolve(device, dtype)
    if gradient_checkpointing is None:
        gradient_checkpointing = runtime.is_cuda  # where memory binds; on the CPU it would only cost time
    if threads:
        torch.set_num_threads(threads)
    out = Path(out) if out is not None else RunDir(run_dir).distill_out(student)
    model_dir = RunDir.distilled_model(out)
    check_output(out, "distill", force=force, inputs=(teacher, student), run_dir=run_dir)
    try:
        pairs = tuple(parse_layer_map(layer_map)) if layer_map else None
    except ValueError as err:
        raise PuzzleError(str(err)) from None
    config = settings_of(DistillConfig, arguments, layer_map=pairs)
    if val_blocks < 1:
        raise PuzzleError(f"val-blocks must be at least 1, got {val_blocks}")
    train_data, val_data = load_blocks(run_dir, "train"), load_blocks(run_dir, "val")
    result_path = out / RESULT_FILE
    sources = _sources(teacher, student)
    if resume and not fsdp.distributed() and _trained_from_others(out, sources):
        # its checkpoints and result are of other teacher or student weights (a parent overwritten in place,
        # a child realised again): nothing of them can be resumed
        print(f"distill: {out} was trained from another teacher or student content than now; starting over")
        resume = arguments["resume"] = False
    if resume and result_path.exists() and model_dir.exists():
        done = read_json(result_path)
        if done.get("config") == {**config.to_json(), **runtime.settings()} and done.get("complete"):
            print(f"distill: {out} is complete (step {done['step']}); nothing to do")
            return model_dir
    if cpu_offload and not runtime.is_cuda and torch.cuda.is_available():
        raise PuzzleError("--cpu-offload offloads from a GPU: it needs --device cuda (or auto) here, where a GPU "
                          "is visible (on the CPU the student is in host memory already)")
    write_marker(out, "distill")  # before the first checkpoint: OUT is this command's from now on
    if not fsdp.distributed():  # before any checkpoint: what this run is trained from
        atomic_write_json(out / SOURCES_FILE, sources)
    if nproc > 1 and not fsdp.distributed():
        fsdp.check_world(config, nproc)
        fsdp.launch(arguments, nproc)
        return model_dir
    teacher_model = load_model(teacher, dtype=runtime.dtype)  # held once, frozen, in the runtime's dtype
    for blocks in (train_data, val_data):
        check_token_ids(blocks, teacher_model.config.vocab_size)
    original = load_model(student)
    record = _student_record(student)
    sharded = fsdp.distributed() or cpu_offload  # FSDP2: over the torchrun job, or one rank here to offload
    trainer = fsdp.FSDPDistiller if sharded else Distiller
    placement = {"compute_dtype": runtime.dtype, "cpu_offload": cpu_offload} if sharded else {"runtime": runtime}
    alone = cpu_offload and not fsdp.distributed() and not fsdp.dist.is_initialized()  # no torchrun job to join
    group = fsdp.one_process(runtime.device) if alone else nullcontext()
    with group:
        distiller = trainer(teacher_model, original, out, config, kept_layers=record.get("kept_layers"),
                            kept_channels=record.get("channels"), gradient_checkpointing=gradient_checkpointing,
                            **placement)
        result = distiller.train(train_data, val_data[:val_blocks], resume=resume)
    if result.student is None:  # a torchrun worker other than rank 0, which saves
        return model_dir
    try:
        tokenizer = load_tokenizer(student)
    except PuzzleError:
        tokenizer = None
    save_student(result.student, original, model_dir, tokenizer, record or None)
    atomic_write_json(result_path, {"teacher": str(teacher), "student": str(student), "step": result.step,
                                    "complete": result.complete, "val": result.val, "config": distiller.settings()})
    print(f"distill: step {result.step}: val LM loss {result.val['lm_loss']:.4f}, KL {result.val['kl']:.4f}, "
          f"top-1 {result.val['top1_agreement']:.3f} -> {model_dir}")
    return model_dir
