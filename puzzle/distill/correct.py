"""`puzzle correct-teacher`: teacher correction (Minitron), the parent fine-tuned on the run's own data.

Minitron ("LLM Pruning and Distillation in Practice: The Minitron Approach", Sreenivas et al. 2024, sec. 2)
first fine-tunes the unpruned parent on the distillation corpus, so that the teacher's distribution matches
the data the pruned student is distilled on; importance, BLD, scoring, GKD and evaluation then all read
the corrected parent. Here that is the GKD loop of `trainer.py` with no teacher: the parent trains on its
own LM loss (kl_weight 0, lm_weight 1), with the same schedule, checkpoints, resumption, device and dtype
handling, progress bar and log as `puzzle distill`.

Everything in RunDir.teacher (R/teacher/):
  model/         the corrected parent, in the parent's own format (a plain Llama stays a plain Llama, a NemotronH
                 hybrid transformers' own NemotronH with the same config, a
                 puzzle child a puzzle child; a GGUF becomes a Hugging Face directory), with its tokenizer
  teacher.json   the parent it came from (path and content fingerprint), the prepared data's fingerprint,
                 steps, training tokens, validation before and after, and the settings (the trainer's)
  sources.json   parent and data the checkpoints are of, written before the first checkpoint
  log.jsonl, val_loss.png, checkpoints/   as distill's (trainer.py)
Once model/ is written, parent.json records it as the run's parent and the original as `parent_original`
(`RunDir.record_teacher`): every later stage uses the corrected parent and refuses the original
(`RunDir.check_parent`). Artefacts a run made from the original before (importance, the library, scores)
record its fingerprint, so the stages that made them redo them.

One process: GKD's FSDP2 (`--nproc`, `--cpu-offload`, puzzle/distill/fsdp.py) shards a teacher and a student
and is not wired to a teacherless run yet; `puzzle plan` prices the one process (`correct_teacher_cost`).
"""

from pathlib import Path

import torch

from puzzle.errors import PuzzleError
from puzzle.io import atomic_write_json, read_json
from puzzle.model.checkpoint import load_config, load_model, load_tokenizer
from puzzle.outputs import check_output, write_marker
from puzzle.run_dir import PARENT_ORIGINAL, RunDir, writes_run_dir
from puzzle.stages import settings_of

from .commands import SOURCES_FILE, save_student
from .trainer import DistillConfig, Distiller

COMMAND = "correct_teacher"


def original_parent(run: RunDir, parent: Path | None) -> Path:
    """The parent to correct: `parent`, else the run's (its original when already corrected). One line when
    it is not the run's, or when it is the run's corrected teacher itself."""
    info = run.info()
    if parent is None:
        parent = info.get(PARENT_ORIGINAL) or info.get("parent")
        if parent is None:
            raise PuzzleError(f"no parent model for {run.root}: pass --parent PATH")
    parent = Path(parent)
    if not parent.exists():
        raise PuzzleError(f"parent model not found: {parent}")
    resolved = parent.resolve()
    if resolved == run.teacher.resolve() or run.teacher.resolve() in resolved.parents:
        raise PuzzleError(f"{parent} is this run's corrected teacher; pass --parent the model it is corrected from")
    original = info.get(PARENT_ORIGINAL)
    if original and Path(original).resolve() != resolved:
        raise PuzzleError(f"{run.root}'s teacher was corrected from {original}, not {parent}; use another --run-dir")
    if not original and "parent" in info and Path(info["parent"]).resolve() != resolved:
        raise PuzzleError(f"{run.root} belongs to parent {info['parent']}, not {resolved}; use another --run-dir")
    load_config(parent)  # a supported architecture (a NemotronH hybrid too): one line before the data and weights
    return parent


def _sources(parent: Path, data_fingerprint: str | None) -> dict[str, str | None]:
    from puzzle.model.fingerprint import fingerprint

    return {"parent": str(parent.resolve()), "parent_fingerprint": fingerprint(parent), "data": data_fingerprint}


def _keeps(out: Path, sources: dict, resume: bool, force: bool) -> bool:
    """Whether `out`'s checkpoints may be resumed: they are of this parent's content and this data. Of another
    parent (path): refused unless `force`; of other bytes at the same path or other data: started over."""
    path = out / SOURCES_FILE
    if not resume or not path.exists():
        return resume
    was = read_json(path)
    if was == sources:
        return True
    if was.get("parent") != sources["parent"] and not force:
        raise PuzzleError(f"{out} holds a teacher corrected from another parent ({was.get('parent')}); pass --force "
                          f"to correct {sources['parent']} there from scratch, or use another --run-dir")
    print(f"correct-teacher: {out} was trained from other parent weights or other data than now; starting over")
    return False


def _finished(run: RunDir, settings: dict, sources: dict) -> bool:
    """Whether R/teacher holds a complete correction under these settings, of these sources, intact."""
    from puzzle.model.fingerprint import fingerprint

    if not (run.teacher_record.is_file() and run.teacher_model.is_dir()):
        return False
    done = read_json(run.teacher_record)
    return (done.get("complete") is True and done.get("config") == settings
            and done.get("sources") == sources and done.get("model_fingerprint") == fingerprint(run.teacher_model))


@writes_run_dir(COMMAND)
def correct_teacher(
    parent: Path | None = None,
    run_dir: Path | None = None,
    steps: int = DistillConfig.steps,
    batch_size: int = DistillConfig.batch_size,
    grad_accum: int = DistillConfig.grad_accum,
    lr: float = DistillConfig.lr,
    min_lr: float = DistillConfig.min_lr,
    warmup_steps: int = DistillConfig.warmup_steps,
    weight_decay: float = DistillConfig.weight_decay,
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
    force: bool = False,
) -> Path:
    """Teacher correction: fine-tune the parent on the run's prepared data (LM loss); later stages use it.

    Writes RUN_DIR/teacher/model (the corrected parent) and teacher.json (what it came from: parent, data,
    steps, tokens), then records it in parent.json as the run's parent: importance, build-library, score,
    distill's teacher and evaluate's reference all use the corrected parent from then on.

    Args:
        parent: the parent to correct (HF dir, safetensors or GGUF); default: the run's recorded parent
        run_dir: run directory whose data/ (from prepare-data) is trained and validated on
        steps: optimizer steps
        batch_size: sequences per micro-batch
        grad_accum: micro-batches per optimizer step
        lr: peak learning rate (after linear warm-up)
        min_lr: learning rate at the end of the cosine decay
        warmup_steps: linear warm-up steps
        weight_decay: AdamW weight decay on matrices
        val_every: validate every this many steps
        val_blocks: validation blocks used (the first ones of the val split)
        checkpoint_every: checkpoint every this many steps
        keep_checkpoints: checkpoints kept (the newest)
        chunk_tokens: tokens whose logits are alive at once in the loss (bounds memory)
        seed: data order seed
        resume: continue from the last checkpoint (--no-resume starts over, discarding it)
        threads: torch CPU threads
        device: auto (CUDA when a GPU is visible, else the CPU), cpu, cuda or cuda:N
        dtype: the autocast dtype (weights and AdamW state stay fp32): auto (bf16 on CUDA, fp32 on the CPU),
            bf16, fp16 or fp32
        gradient_checkpointing: recompute each decoder layer in the backward instead of keeping its
            activations (default: on for CUDA, off on the CPU)
        force: correct from scratch over a correction of another parent in RUN_DIR/teacher
    """
    arguments = dict(locals())
    from puzzle.data.blocks import check_token_ids, load_blocks, load_meta
    from puzzle.device import resolve

    if run_dir is None:
        raise PuzzleError("--run-dir is required")
    run = RunDir(Path(run_dir))
    parent = original_parent(run, parent)
    runtime = resolve(device, dtype)
    if gradient_checkpointing is None:
        gradient_checkpointing = runtime.is_cuda
    if threads:
        torch.set_num_threads(threads)
    config = settings_of(DistillConfig, arguments, kl_weight=0.0, lm_weight=1.0)  # the LM loss alone
    if val_blocks < 1:
        raise PuzzleError(f"val-blocks must be at least 1, got {val_blocks}")
    out, model_dir = run.teacher, run.teacher_model
    check_output(out, COMMAND, force=force, inputs=(parent,), run_dir=run.root)
    train_data, val_data = load_blocks(run.root, "train"), load_blocks(run.root, "val")  # none: one line
    sources = _sources(parent, load_meta(run.root).get("fingerprint"))
    resume = _keeps(out, sources, resume, force)
    settings = {**config.to_json(), **runtime.settings()}
    if resume and _finished(run, settings, sources):
        run.record_teacher(parent, model_dir)  # idempotent: a parent.json rewritten since gets it back
        print(f"correct-teacher: {model_dir} is complete; nothing to do")
        return model_dir
    write_marker(out, COMMAND)  # before the first checkpoint: R/teacher is this command's from now on
    atomic_write_json(out / SOURCES_FILE, sources)
    model = load_model(parent)  # fp32 master weights (the trainer keeps them fp32 and autocasts)
    for blocks in (train_data, val_data):
        check_token_ids(blocks, model.config.vocab_size)
    trainer = Distiller(None, model, out, config, runtime=runtime, gradient_checkpointing=gradient_checkpointing)
    result = trainer.train(train_data, val_data[:val_blocks], resume=resume, desc="correct-teacher")
    try:
        tokenizer = load_tokenizer(parent)
    except PuzzleError:
        tokenizer = None
    save_student(result.student, model, model_dir, tokenizer, command=COMMAND)
    vals = [r for r in result.history if r.get("split") == "val"]
    trained = [r for r in result.history if r.get("split") == "train"]
    from puzzle.model.fingerprint import fingerprint

    atomic_write_json(run.teacher_record, {
        "parent": str(parent.resolve()), "model": str(model_dir.resolve()), "sources": sources,
        "model_fingerprint": fingerprint(model_dir), "step": result.step, "complete": result.complete,
        "tokens": trained[-1]["tokens"] if trained else 0, "val_before": vals[0] if vals else {},
        "val": result.val, "config": trainer.settings(),
    })
    before = vals[0].get("lm_loss") if vals else float("nan")
    line = f"correct-teacher: step {result.step}: val LM loss {before:.4f} -> {result.val['lm_loss']:.4f} -> {model_dir}"
    if result.complete:  # an unfinished correction (stopped early) is no parent yet
        had = run.info().get("parent")
        run.record_teacher(parent, model_dir)
        line += " (the run's parent from now on"
        line += "; what the run made from the original is redone by the stages that made it)" if had == str(
            parent.resolve()) else ")"
    print(line)
    return model_dir
