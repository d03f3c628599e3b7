"""Knowledge distillation loop: a student learns a teacher's next-token distribution.

Loss = kl_weight * forward KL(teacher || student) at a temperature + lm_weight * the student's LM loss
+ hidden_weight * a cosine / MSE loss between mapped hidden states (through a learned projection when
the widths differ). AdamW with linear warm-up then cosine decay to `min_lr`, gradient accumulation,
gradient clipping; validation (LM loss, KL to the teacher, top-1 agreement) every `val_every` steps.

Precision and memory (`runtime`, puzzle.device): the teacher is held once in the runtime's dtype, frozen
(no gradients, no optimizer state); the student keeps fp32 (master) weights and fp32 AdamW moments (fused
on CUDA) and runs its forward under `torch.autocast` in bf16 / fp16 (fp16 with a GradScaler on CUDA);
fp32 is plain fp32 training. `gradient_checkpointing` recomputes each decoder layer in the backward
(transformers' GradientCheckpointingLayer, non-reentrant torch.utils.checkpoint) instead of keeping its
activations: O(1) layers of activations instead of O(L), for about one more forward of compute.

Without a teacher (`teacher=None`: `puzzle correct-teacher`, Minitron's teacher correction) the same loop
trains the student's own LM loss alone (kl_weight 0, no hidden loss); validation reports LM loss and
perplexity only.

Everything in `out_dir`:
  log.jsonl        one record per optimizer step (split "train") and per validation (split "val")
  val_loss.png     validation LM loss and KL against steps
  checkpoints/step_NNNNNN/  model.safetensors (student + projection weights), optimizer.safetensors
                   (AdamW moments and the torch RNG state as tensors), trainer.json (step, settings, and
                   each file's sha256 and size, written last)

A checkpoint is used only when its files match the hashes in its trainer.json: a damaged one (a flipped
bit, a truncated file) is skipped with a one-line warning and the newest intact earlier one is used, or
the run starts over when none is left.

Resuming reproduces the uninterrupted run exactly: micro-batch i is always the same blocks (a function
of i and the seed, not of how the run was cut), and weights, optimizer moments and RNG come back from
the checkpoint; log records past the checkpoint are dropped and recomputed.
"""

import functools
import json
import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from puzzle import training
from puzzle.device import Runtime, place
from puzzle.errors import PuzzleError
from puzzle.io import (
    JsonlLog,
    atomic_open,
    atomic_save_safetensors,
    atomic_write_json,
    atomic_write_text,
    clean_stale_temps,
    sha256_file,
)
from puzzle.model import PuzzleForCausalLM
from puzzle.model.checkpoint import atomic_directory, to_puzzle

from puzzle.metrics import KEYS, Sums, kd_terms

from .losses import HiddenLoss, default_layer_map, hidden_state_loss

log = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"
PLOT_FILE = "val_loss.png"
CHECKPOINTS = "checkpoints"
# Settings that may change between an interrupted run and its resumption without changing its maths.
_RESUMABLE_CHANGES = {"val_every", "checkpoint_every", "keep_checkpoints"}
VAL_KEYS = tuple(k for k in KEYS if k != "tokens")  # a val record's `tokens` counts training tokens (see _metrics)
CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors")
START_OVER = "pass --no-resume (in a `puzzle run` config: resume: false in the stage's section) to start over"


class DamagedCheckpoint(Exception):
    """A checkpoint whose files do not match its record (or cannot be read); the reason is the message."""


def check_file(checkpoint: Path, name: str, record: dict[str, Any]) -> None:
    """DamagedCheckpoint unless `checkpoint/name` has the size and sha256 its trainer.json `record` gives."""
    file = checkpoint / name
    if not file.is_file():
        raise DamagedCheckpoint(f"{name} is missing")
    size = file.stat().st_size
    if size != record.get("bytes"):
        raise DamagedCheckpoint(f"{name} has {size} bytes, {record.get('bytes')} recorded (truncated?)")
    if sha256_file(file) != record.get("sha256"):
        raise DamagedCheckpoint(f"{name} does not match its recorded sha256 (damaged)")


def check_resumable(meta: dict[str, Any], settings: dict[str, Any], param_names: list[str], out_dir: Path,
                    path: Path) -> None:
    """PuzzleError unless the checkpoint `meta` (its trainer.json) was written under `settings` (a
    distiller's `settings()`: the config and a non-fp32 dtype; up to the settings in _RESUMABLE_CHANGES)
    for a student with these parameter names."""
    saved = {k: v for k, v in meta["config"].items() if k not in _RESUMABLE_CHANGES}
    now = {k: v for k, v in settings.items() if k not in _RESUMABLE_CHANGES}
    changed = sorted(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in now.keys() | saved.keys()
                     if saved.get(k) != now.get(k))  # name, both values (a key only one side has: the dtype)
    if changed:
        raise PuzzleError(f"{out_dir} holds a run with different settings ({', '.join(changed)}); "
                          f"{START_OVER}, or choose another output directory")
    if meta["param_names"] != param_names:
        raise PuzzleError(f"{path}: the checkpoint is of a different student; {START_OVER}")


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 200  # optimizer steps
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4  # peak
    min_lr: float = 1e-5  # end of the cosine
    warmup_steps: int = 10
    weight_decay: float = 0.01  # on matrices only, not on norms
    betas: tuple[float, float] = training.BETAS
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    temperature: float = 1.0
    kl_weight: float = 1.0
    lm_weight: float = 0.0
    hidden_loss: HiddenLoss = "none"
    hidden_weight: float = 1.0
    layer_map: tuple[tuple[int, int], ...] | None = None  # (student, teacher) hidden_states indices
    val_every: int = 50
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    chunk_tokens: int = 1024  # tokens whose logits are alive at once in the KL
    seed: int = 0

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "val_every", "checkpoint_every", "keep_checkpoints", "chunk_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise PuzzleError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.min_lr <= self.lr:
            raise PuzzleError(f"learning rates must satisfy 0 < min-lr <= lr, got lr={self.lr}, min-lr={self.min_lr}")
        if self.warmup_steps < 0:
            raise PuzzleError(f"warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.temperature <= 0:
            raise PuzzleError(f"temperature must be positive, got {self.temperature}")
        if self.hidden_loss not in ("none", "cosine", "mse"):
            raise PuzzleError(f"hidden-loss must be none, cosine or mse, got {self.hidden_loss!r}")
        if self.kl_weight == 0 and self.lm_weight == 0 and self.hidden_loss == "none":
            raise PuzzleError("every loss weight is zero: nothing to train")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["betas"] = list(self.betas)
        data["layer_map"] = [list(p) for p in self.layer_map] if self.layer_map is not None else None
        return data


def lr_at(step: int, config: DistillConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up to `lr`, cosine down to `min_lr`."""
    return training.cosine_lr(step, steps=config.steps, warmup=config.warmup_steps, peak=config.lr, floor=config.min_lr)


@dataclass
class DistillResult:
    student: PuzzleForCausalLM
    step: int
    complete: bool
    val: dict[str, float]  # the last validation
    out_dir: Path
    projection: nn.Module | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def _as_tensor_blocks(blocks: Any) -> Any:
    if isinstance(blocks, torch.Tensor):
        return blocks.cpu().numpy()
    return blocks


@torch.no_grad()
def teacher_outputs(teacher: PuzzleForCausalLM | None, batches: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """The teacher's final normed hidden states per batch (cheap to keep; logits are made per chunk); one
    None per batch without a teacher."""
    if teacher is None:
        return [None] * len(batches)
    device = next(teacher.parameters()).device
    return [teacher.model(input_ids=b.to(device), use_cache=False).last_hidden_state for b in batches]


@torch.no_grad()
def evaluate_kd(
    teacher: PuzzleForCausalLM | None,
    student: PuzzleForCausalLM,
    batches: list[torch.Tensor],
    *,
    teacher_hidden: list[torch.Tensor | None] | None = None,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
) -> dict[str, float]:
    """Student LM loss and perplexity, KL(teacher || student) per token (at temperature 1 unless given) and
    top-1 agreement with the teacher over `batches` of token ids (B, T), under `puzzle.metrics.KEYS` (no KL
    and agreement without a teacher)."""
    if not batches:
        raise PuzzleError("no validation batches")
    teacher_hidden = teacher_hidden or teacher_outputs(teacher, batches)
    device = next(student.parameters()).device
    sums = Sums()
    was_training = student.training
    student.eval()
    for ids, t_h in zip(batches, teacher_hidden):
        ids = ids.to(device)
        s_h = student.model(input_ids=ids, use_cache=False).last_hidden_state
        head = teacher.lm_head if teacher is not None else None
        sums = sums + kd_terms(s_h, t_h, student.lm_head, head, ids, temperature, chunk_tokens).sums()
    student.train(was_training)
    return sums.means(teacher=teacher is not None)


def enable_checkpointing(model: PuzzleForCausalLM) -> None:
    """Recompute each decoder layer in the backward (PuzzleDecoderLayer is transformers'
    GradientCheckpointingLayer), non-reentrant as torch advises. transformers 5 calls it
    activation_checkpointing_enable (gradient_checkpointing_enable is its deprecated alias), 4.x only the latter."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def is_checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def make_projection(student_width: int, teacher_width: int, kept_channels: list[int] | None = None) -> nn.Linear:
    """Student -> teacher hidden width. From a width-pruned student (`kept_channels` known) it starts as
    the map putting each kept channel back where it came from."""
    proj = nn.Linear(student_width, teacher_width, bias=False)
    if kept_channels is not None and len(kept_channels) == student_width:
        with torch.no_grad():
            proj.weight.zero_()
            proj.weight[torch.as_tensor(kept_channels), torch.arange(student_width)] = 1.0
    return proj


class Distiller:
    """One distillation run in `out_dir`; `train` starts it or resumes it from its last checkpoint."""

    def __init__(
        self,
        teacher: PuzzleForCausalLM | None,
        student: Any,
        out_dir: str | Path,
        config: DistillConfig,
        *,
        kept_layers: list[int] | None = None,
        kept_channels: list[int] | None = None,
        runtime: Runtime | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        """`runtime` (puzzle.device.resolve): where and in which precision to train; the teacher and the
        student are placed there (in place: no copy). None: both stay where and as they are, fp32 maths.
        `teacher` None: the student trains on its own LM loss alone (config: kl_weight 0, no hidden loss)."""
        if teacher is None and (config.kl_weight != 0 or config.hidden_loss != "none" or config.lm_weight == 0):
            raise ValueError("without a teacher only the LM loss trains: kl_weight 0, hidden_loss none, lm_weight > 0")
        self.teacher = to_puzzle(teacher).eval().requires_grad_(False) if teacher is not None else None
        self.student = to_puzzle(student)
        if runtime is not None and self.teacher is not None:
            place(self.teacher, runtime.device, runtime.dtype)  # held once, in the low dtype
        if runtime is not None:
            place(self.student, runtime.device, torch.float32)  # fp32 master weights
        self.runtime = runtime or Runtime(next(self.student.parameters()).device, "fp32")
        if gradient_checkpointing:
            enable_checkpointing(self.student)
        self.config = config
        self.out_dir = Path(out_dir)
        self.log = JsonlLog(self.out_dir / LOG_FILE)
        ts = self.student.config
        tt = self.teacher.config if self.teacher is not None else ts
        if ts.vocab_size != tt.vocab_size:
            raise PuzzleError(f"student and teacher vocabularies differ ({ts.vocab_size} vs {tt.vocab_size})")
        self.projection = None
        self.layer_map: list[tuple[int, int]] = []
        if config.hidden_loss != "none":
            if ts.hidden_size != tt.hidden_size:
                self.projection = make_projection(ts.hidden_size, tt.hidden_size, kept_channels)
                self.projection.to(next(self.student.parameters()).device)
            self.layer_map = list(config.layer_map or default_layer_map(ts.num_hidden_layers, tt.num_hidden_layers, kept_layers))
            for s, t in self.layer_map:
                if not (0 <= s <= ts.num_hidden_layers and 0 <= t <= tt.num_hidden_layers):
                    raise PuzzleError(f"layer map pair {s}:{t} is out of range (student has {ts.num_hidden_layers} "
                                      f"layers, teacher {tt.num_hidden_layers}; 0 = embeddings)")
        self._shard()
        # the parameters the optimizer steps: the student's and the projection's (their shards under FSDP2)
        self.params = list(self.student.named_parameters())
        if self.projection is not None:
            self.params += [(f"projection.{n}", p) for n, p in self.projection.named_parameters()]
        self.optimizer = training.adamw((p for _, p in self.params), lr=config.lr, weight_decay=config.weight_decay,
                                        betas=config.betas, implementation=self._adamw_implementation())
        self.scaler = self.runtime.grad_scaler()  # fp16 on CUDA: loss scaling; a pass-through otherwise

    def _shard(self) -> None:
        """Where the student and teacher are distributed before the optimizer is built over the student's
        parameters: nothing here (one process); FSDPDistiller shards them."""

    def _adamw_implementation(self) -> dict[str, Any] | None:
        """AdamW's kernel: fused on CUDA, torch's default (the per-tensor loop) on the CPU."""
        return self.runtime.adamw_kwargs() if self.runtime.is_cuda else None

    def settings(self) -> dict[str, Any]:
        """What a checkpoint and result.json record and compare on resume: the config, and the dtype when
        it is not fp32 (`Runtime.settings`: runs written before --dtype keep resuming)."""
        return {**self.config.to_json(), **self.runtime.settings()}

    # --- the loss of one micro-batch -------------------------------------------------------------
    def _loss(self, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The micro-batch's loss, its forward (teacher, student, chunked logits) under the runtime's
        autocast (nothing under fp32); the caller runs the backward outside it."""
        with self.runtime.autocast():
            return self._forward_loss(ids)

    def _forward_loss(self, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        need_hidden = c.hidden_loss != "none"
        if self.teacher is None:  # teacher correction: the LM loss alone
            s_h = self.student.model(input_ids=ids, use_cache=False).last_hidden_state
            terms = kd_terms(s_h, None, self.student.lm_head, None, ids, chunk_tokens=c.chunk_tokens)
            lm = terms.lm / terms.lm_tokens
            return c.lm_weight * lm, {"lm_loss": lm.item(), "loss": c.lm_weight * lm.item()}
        with torch.no_grad():
            t_out = self.teacher.model(input_ids=ids, output_hidden_states=need_hidden, use_cache=False)
        s_out = self.student.model(input_ids=ids, output_hidden_states=need_hidden, use_cache=False)
        terms = kd_terms(s_out.last_hidden_state, t_out.last_hidden_state, self.student.lm_head, self.teacher.lm_head,
                         ids, c.temperature, c.chunk_tokens)
        kl = terms.kl / terms.tokens
        lm = terms.lm / terms.lm_tokens
        loss = c.kl_weight * kl + c.lm_weight * lm
        stats = {"kl": kl.item(), "lm_loss": lm.item(), "top1_agreement": terms.agree.item() / terms.tokens}
        if need_hidden:
            hidden = sum(hidden_state_loss(s_out.hidden_states[s], t_out.hidden_states[t], c.hidden_loss, self.projection)
                         for s, t in self.layer_map) / len(self.layer_map)
            loss = loss + c.hidden_weight * hidden
            stats["hidden"] = hidden.item()
        stats["loss"] = loss.item()
        return loss, stats

    # --- checkpoints -----------------------------------------------------------------------------
    def _checkpoint_dirs(self) -> list[tuple[int, Path]]:
        root = self.out_dir / CHECKPOINTS
        found = []
        for path in root.glob("step_*") if root.exists() else []:
            match = re.fullmatch(r"step_(\d+)", path.name)
            if match and (path / "trainer.json").exists():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def save_checkpoint(self, step: int, elapsed: float, tokens: int) -> Path:
        out = self.out_dir / CHECKPOINTS / f"step_{step:06d}"
        with atomic_directory(out) as tmp:
            atomic_save_safetensors(tmp / "model.safetensors", {n: p for n, p in self.params})
            opt = self.optimizer.state_dict()
            tensors = {f"state.{i}.{k}": v for i, s in opt["state"].items() for k, v in s.items()}
            tensors["rng.torch"] = torch.get_rng_state()
            atomic_save_safetensors(tmp / "optimizer.safetensors", tensors)
            groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]]
            files = {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                     for name in CHECKPOINT_FILES}
            atomic_write_json(tmp / "trainer.json", {
                "step": step, "elapsed_s": elapsed, "tokens": tokens, "config": self.settings(),
                "param_names": [n for n, _ in self.params], "param_groups": groups, "files": files,
            })
        self._drop_old_checkpoints()
        return out

    def _drop_old_checkpoints(self) -> None:
        """Keep the newest `keep_checkpoints` checkpoints."""
        for _, old in self._checkpoint_dirs()[: -self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def verify_checkpoint(path: Path) -> dict[str, Any]:
        """The checkpoint's trainer.json once every file matches its recorded hash; else DamagedCheckpoint."""
        try:
            meta = json.loads((path / "trainer.json").read_text())
        except (OSError, ValueError) as err:
            raise DamagedCheckpoint(f"trainer.json is unreadable ({err})") from None
        files = meta.get("files") if isinstance(meta, dict) else None
        if not isinstance(files, dict):  # every checkpoint we write records them: without, nothing is verified
            raise DamagedCheckpoint("trainer.json records no file hashes, so its files cannot be verified")
        for name in CHECKPOINT_FILES:
            check_file(path, name, files.get(name) or {})
        return meta

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Restore weights, optimizer and RNG from a checkpoint. DamagedCheckpoint when its files are not
        intact; PuzzleError when it is intact but of other settings or another student."""
        meta = self.verify_checkpoint(path)
        check_resumable(meta, self.settings(), [n for n, _ in self.params], self.out_dir, path)
        try:
            weights = load_file(str(path / "model.safetensors"))
            tensors = load_file(str(path / "optimizer.safetensors"))
        except (SafetensorError, OSError) as err:
            raise DamagedCheckpoint(f"unreadable safetensors ({str(err).splitlines()[0]})") from None
        with torch.no_grad():
            for name, p in self.params:
                p.copy_(weights[name])
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("state."):
                _, i, name = key.split(".", 2)
                state.setdefault(int(i), {})[name] = value
        groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        torch.set_rng_state(tensors["rng.torch"])
        return meta

    def _resume(self) -> dict[str, Any] | None:
        """Load the newest intact checkpoint; None when there is none, so the run starts over. Each damaged
        one newer than it gets a one-line warning and is removed (the run recomputes its steps)."""
        damaged: list[tuple[Path, str]] = []
        meta, used = None, None
        for _, path in reversed(self._checkpoint_dirs()):
            try:
                meta, used = self.load_checkpoint(path), path
                break
            except DamagedCheckpoint as err:
                damaged.append((path, str(err)))
        then = f"resuming from {used.name}" if used is not None else "no intact checkpoint left, starting from step 0"
        for path, why in damaged:
            log.warning("GKD checkpoint %s skipped: %s; %s", path, why, then)
            shutil.rmtree(path, ignore_errors=True)
        return meta

    def _truncate_log(self, step: int) -> None:
        kept = [r for r in self.log.read() if r.get("step", 0) <= step]
        atomic_write_text(self.log.path, "".join(_json_line(r) for r in kept))

    def reset(self) -> None:
        """Forget any earlier run in `out_dir` (checkpoints and log)."""
        shutil.rmtree(self.out_dir / CHECKPOINTS, ignore_errors=True)
        self.log.path.unlink(missing_ok=True)
        (self.out_dir / PLOT_FILE).unlink(missing_ok=True)

    # --- the loop --------------------------------------------------------------------------------
    # The hooks below are one process's; puzzle/distill/fsdp.py's FSDPDistiller overrides them (ranks, the
    # sharded forward, the gathered student) and runs this same loop on every rank.
    rank, world = 0, 1  # this process's share of each step's micro-batches

    @property
    def lead(self) -> bool:
        """Whether this process writes the log, the plot and the run directory's files."""
        return self.rank == 0

    def _barrier(self) -> None:
        """Wait for the other processes (none here)."""

    @property
    def _device(self) -> torch.device:
        return self.runtime.device

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args): a forward through the student (and teacher); FSDP runs it inside its root unit."""
        return fn(*args)

    def _teacher(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) reading only the teacher."""
        return fn(*args)

    def _validate(self, batches: list[torch.Tensor], teacher_hidden: list[torch.Tensor]) -> dict[str, float]:
        run = functools.partial(evaluate_kd, self.teacher, self.student, batches, teacher_hidden=teacher_hidden,
                                chunk_tokens=self.config.chunk_tokens)
        with self.runtime.autocast():
            return _metrics(self._run(run))

    def _reduce(self, totals: dict[str, float], tokens: int) -> tuple[dict[str, float], int]:
        """A step's loss terms and tokens over all processes (this one's here)."""
        return totals, tokens

    def _accumulate(self, data: training.BatchStream, step: int) -> tuple[dict[str, float], int]:
        """This process's micro-batches of step `step` (every `world`-th), forward and backward; the step's loss
        terms (means over its micro-batches) and its tokens, over all processes (`_reduce`)."""
        c = self.config
        totals: dict[str, float] = {}
        tokens = 0
        for micro in range(self.rank, c.grad_accum, self.world):
            ids = data[step * c.grad_accum + micro].to(self._device)
            loss, stats = self._run(self._loss, ids)
            # x world: FSDP averages gradients over ranks, so each rank's sum is the mean over micro-batches
            self.scaler.scale(loss * self.world / c.grad_accum).backward()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v / c.grad_accum
            tokens += ids.numel()
        return self._reduce(totals, tokens)

    def _clip(self) -> torch.Tensor:
        """Unscale (a no-op without loss scaling) and clip the true gradients; their global norm."""
        self.scaler.unscale_(self.optimizer)
        c = self.config
        return torch.nn.utils.clip_grad_norm_([p for _, p in self.params], c.grad_clip if c.grad_clip > 0 else float("inf"))

    def _final(self) -> tuple[PuzzleForCausalLM | None, nn.Module | None]:
        """The trained student and hidden-loss projection to return."""
        return self.student, self.projection

    def train(
        self,
        train_blocks: Any,
        val_blocks: Any,
        *,
        val_batch_size: int | None = None,
        resume: bool = True,
        stop_after: int | None = None,
        progress: bool = True,
        desc: str = "distill",
    ) -> DistillResult:
        """Train to `config.steps` (or stop after `stop_after` steps, leaving the run resumable). Collective
        under FSDP: every rank runs it; the lead one writes the log, the plot and the checkpoints' record.

        `train_blocks` / `val_blocks`: (n, T) token ids (numpy memmap, array or tensor); `desc`: the progress bar's label."""
        c, lead = self.config, self.lead
        data = training.BatchStream(_as_tensor_blocks(train_blocks), c.batch_size, c.seed)
        val = torch.as_tensor(np.asarray(_as_tensor_blocks(val_blocks), dtype=np.int64))
        vbs = val_batch_size or c.batch_size
        val_batches = [val[i : i + vbs].to(self._device) for i in range(0, len(val), vbs)]
        if lead:
            if not resume:
                self.reset()
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # what a killed run left: temp files, checkpoints/.step_*.tmp-*/ and the trained model's temporaries
            clean_stale_temps(self.out_dir, recursive=True)
        self._barrier()
        start, elapsed, tokens = 0, 0.0, 0
        meta = self._resume()
        if meta is not None:
            start, elapsed, tokens = meta["step"], meta["elapsed_s"], meta["tokens"]
            if lead:
                self._truncate_log(start)
        elif lead:
            self.log.path.unlink(missing_ok=True)
        teacher_hidden = self._teacher(teacher_outputs, self.teacher, val_batches)
        validate = functools.partial(self._validate, val_batches, teacher_hidden)
        last_val = None
        if start == 0:
            last_val = validate()
            if lead:
                self.log.write(split="val", step=0, tokens=0, elapsed_s=0.0, **last_val)
        end = c.steps if stop_after is None else min(c.steps, stop_after)
        self.student.train()
        clock = time.perf_counter()
        bar = tqdm(range(start, end), desc=desc, unit="step", disable=not (progress and lead), initial=0)
        for step in bar:
            lr = lr_at(step, c)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            totals, step_tokens = self._accumulate(data, step)
            tokens += step_tokens
            grad_norm = self._clip()
            self.scaler.step(self.optimizer)  # skips the step on inf / NaN gradients under fp16 scaling
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            done = step + 1
            now = elapsed + time.perf_counter() - clock
            if lead:
                self.log.write(split="train", step=done, lr=lr, grad_norm=grad_norm.item(), tokens=tokens,
                               elapsed_s=now, **totals)
            bar.set_postfix({k: f"{totals[k]:.4f}" for k in ("loss", "kl") if k in totals})
            if training.due(done, c.val_every, c.steps):
                last_val = validate()
                self.student.train()
                if lead:
                    self.log.write(split="val", step=done, tokens=tokens, elapsed_s=now, **last_val)
            if training.due(done, c.checkpoint_every, c.steps):
                self.save_checkpoint(done, elapsed + time.perf_counter() - clock, tokens)
        self.student.eval()
        step = max(start, end)
        student, projection = self._final()
        history: list[dict[str, Any]] = []
        if lead:
            history = list(self.log.read())
            if last_val is None:
                vals = [r for r in history if r.get("split") == "val"]
                last_val = {k: vals[-1][k] for k in (*VAL_KEYS, "val_tokens") if k in vals[-1]} if vals else {}
            plot_validation(self.log.path, self.out_dir / PLOT_FILE)
        self._barrier()
        return DistillResult(student=student, step=step, complete=step >= c.steps, val=last_val or {},
                             out_dir=self.out_dir, projection=projection, history=history)


def _metrics(val: dict[str, float]) -> dict[str, float]:
    """Validation metrics as logged: `tokens` in a log record counts training tokens seen."""
    return {("val_tokens" if k == "tokens" else k): v for k, v in val.items()}


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(record) + "\n"


def plot_validation(log_path: str | Path, png_path: str | Path) -> Path | None:
    """Validation LM loss and KL to the teacher (when there is one) against optimizer steps (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vals = [r for r in JsonlLog(log_path).read() if r.get("split") == "val"]
    if not vals:
        return None
    steps = [r["step"] for r in vals]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, [r["lm_loss"] for r in vals], marker="o", label="val LM loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("LM loss (nats/token)")
    lines = ax.get_lines()
    if all("kl" in r for r in vals):
        kl_ax = ax.twinx()
        kl_ax.plot(steps, [r["kl"] for r in vals], marker="s", color="tab:orange", label="val KL to teacher")
        kl_ax.set_ylabel("KL (nats/token)")
        lines += kl_ax.get_lines()
    ax.legend(lines, [l.get_label() for l in lines], loc="upper right")
    ax.set_title("distillation: validation" if all("kl" in r for r in vals) else "training: validation")
    fig.tight_layout()
    png_path = Path(png_path)
    with atomic_open(png_path) as f:  # a fresh temp file (O_EXCL), never one planted in its place
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return png_path
