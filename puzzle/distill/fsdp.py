"""GKD on N processes with FSDP2: the student sharded over ranks, the same run as one process.

Launch: `puzzle distill ... --nproc N` starts `torchrun --standalone --nproc-per-node N -m puzzle.distill.torchrun`
with the same flags and holds the run directory's lock for it; `torchrun --nproc-per-node N -m
puzzle.distill.torchrun ...` (flags as `puzzle distill`'s) works by hand too, rank 0 then holding the lock.
Backend: nccl on CUDA (rank r on cuda:LOCAL_RANK), gloo on CPU.

Sharding (torch.distributed.fsdp.fully_shard, as torchtitan's `apply_fsdp`): each student decoder layer is
one FSDP unit, the rest (embeddings, final norm, LM head, the hidden-loss projection) the root unit. With a
compute dtype below fp32, `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`: fp32 master shards,
bf16 gathered weights, fp32 gradient reduction. The teacher is frozen; it is replicated on every rank
unless it would take more than TEACHER_REPLICA_FRACTION of a device's memory, then sharded the same way
(an all-gather per layer per micro-batch instead of a copy per rank).

Data: optimizer step s uses micro-batches s*grad_accum .. s*grad_accum + grad_accum - 1, as in one process;
rank r takes those with micro % N == r. Each rank backpropagates loss * N / grad_accum and FSDP averages
the gradients over ranks, so the update is the one-process mean over the grad_accum micro-batches. The
step's logged loss terms are summed over ranks. Validation runs the same batches on every rank (it is
small, and keeps the ranks' collectives in step).

Checkpoints (`checkpoints/step_NNNNNN/`): model + optimizer state through torch.distributed.checkpoint
(`get_state_dict` / `dcp.save`: `.metadata` and one `__R_0.distcp` per rank), each rank's RNG state
(`rng_R.safetensors`), and trainer.json written last by rank 0 with the step, the data position, the
settings and every file's sha256 and size. The directory is written under a temporary name and renamed
when complete; resume verifies every file (the ranks share the hashing) and falls back to an earlier
checkpoint as one-process GKD does. DCP reshards on load, so a run may resume on another number of
ranks. The output directory must be one filesystem that every rank writes (one node, or a shared mount).

Every rank loads the full teacher and student before sharding (N host copies); the final student is
gathered to rank 0 (full state dict) and saved as one-process GKD saves it.

CPU offload (`puzzle distill --cpu-offload`, FSDP2's `CPUOffloadPolicy` on the student's units, as
torchtitan's `apply_fsdp` passes it): the student's fp32 shards, their gradients and the AdamW moments stay
in host memory (pinned on CUDA, for asynchronous copies); FSDP2 copies each unit's shards to the GPU to
gather them for its forward and backward, moves the reduced gradient shards back to the host, and the
optimizer steps on the CPU. The GPU holds the frozen teacher (or its shard), the gathered layers in flight
and the activations: a student whose 16 bytes per parameter exceed the GPU trains on it. With one process
the job needs no torchrun: `one_process` makes a one-rank group in the calling process (an in-memory
store), so the run directory's lock, user errors and the pipeline's stage call stay as one-process GKD's.
The maths is FSDP2's without offload (the same reductions, on another device), so checkpoints are the
same DCP checkpoints and a run may resume with or without offload.
"""

from contextlib import contextmanager
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from puzzle import dtypes
from puzzle.errors import PuzzleError
from puzzle.io import atomic_save_safetensors, atomic_write_json, sha256_file
from puzzle.model import PuzzleForCausalLM
from puzzle.model.checkpoint import atomic_dir, commit_dir
from puzzle.units import host_memory_bytes

from .trainer import (
    CHECKPOINTS,
    DamagedCheckpoint,
    DistillConfig,
    Distiller,
    check_file,
    check_resumable,
)

log = logging.getLogger(__name__)

# `puzzle distill --nproc N` holds the run directory's lock for its torchrun workers and says so here,
# and names a file where rank 0 leaves a user error's one line for it to end with.
LOCK_HELD_ENV = "PUZZLE_DISTILL_LOCK_HELD"
ERROR_FILE_ENV = "PUZZLE_DISTILL_ERROR_FILE"
# A replica of the teacher may take this much of one device's memory (host memory / local ranks on CPU);
# a larger teacher is sharded: the student's shards, gradients, AdamW moments and activations need the rest.
TEACHER_REPLICA_FRACTION = 0.25
TeacherSharding = Literal["auto", "replicate", "shard"]
METADATA = ".metadata"  # DCP's index of the shards


# --- the process group ----------------------------------------------------------------------------------

def world_size() -> int:
    """Processes in this job: torchrun's WORLD_SIZE, 1 outside torchrun."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def distributed() -> bool:
    return world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def init_distributed() -> torch.device:
    """Join the torchrun job (nccl on CUDA with one GPU per local rank, gloo on CPU), or the group already
    made in this process (an earlier run's, or `one_process`'s); this rank's device, named by the group's
    backend. Ranks other than 0 log errors only: rank 0 speaks for the job."""
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    if dist.get_rank() != 0:
        logging.getLogger("puzzle").setLevel(logging.ERROR)
    return device


@contextmanager
def one_process(device: torch.device) -> Iterator[None]:
    """A one-rank process group in this process for FSDP2 without torchrun (`--cpu-offload` on one
    device): an in-memory store, nccl on `device` if it is a GPU, else gloo; destroyed on exit."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def check_world(config: DistillConfig, nproc: int) -> None:
    """One line unless `nproc` ranks can share a step's micro-batches evenly."""
    if config.grad_accum % nproc:
        raise PuzzleError(f"grad-accum ({config.grad_accum}) must be a multiple of the process count ({nproc}): "
                          f"each of the {nproc} processes takes grad-accum / {nproc} of a step's micro-batches "
                          f"(e.g. --grad-accum {nproc * max(1, config.grad_accum // nproc)})")


def _broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(value: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


# --- sharding -------------------------------------------------------------------------------------------

class FSDPRoot(nn.Module):
    """The FSDP2 root over a model's parts, whose `forward(run, *args)` is `run(*args)`.

    FSDP2 gathers a unit's parameters in that unit's forward hooks. Our losses use a model through its parts
    (`student.model`, then `student.lm_head.weight` in the chunked KL, which never builds full logits), so
    they run inside this root's forward: the root unit (embeddings, norm, head) is gathered for all of it,
    and for the backward that follows."""

    def __init__(self, **parts: nn.Module | None) -> None:
        super().__init__()
        for name, part in parts.items():
            if part is not None:
                self.add_module(name, part)

    def forward(self, run: Callable[..., Any], *args: Any) -> Any:
        return run(*args)


def offload_policy(cpu_offload: bool, device: torch.device) -> OffloadPolicy:
    """FSDP2's policy: CPUOffloadPolicy (host memory pinned on CUDA only: pinning is for copies to a GPU)
    or none (OffloadPolicy(), fully_shard's default)."""
    return CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()


def shard(root: FSDPRoot, layers: nn.ModuleList, mesh: DeviceMesh, compute_dtype: torch.dtype,
          offload: OffloadPolicy | None = None) -> FSDPRoot:
    """fully_shard each decoder layer, then the root (torchtitan's `apply_fsdp`; the root keeps its
    parameters gathered between forward and backward), every unit under `offload` (default: none)."""
    mp = (MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
          if compute_dtype != torch.float32 else MixedPrecisionPolicy())
    offload = offload or OffloadPolicy()
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=offload)
    fully_shard(root, mesh=mesh, mp_policy=mp, offload_policy=offload)
    return root


def model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def device_memory(device: torch.device) -> int:
    """Bytes one rank may use: the GPU's memory, or on CPU the host's memory over the local ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return host_memory_bytes() // int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))


def shard_teacher(mode: TeacherSharding, teacher_bytes: int, memory: int) -> bool:
    """Whether to shard the frozen teacher: asked for, or (auto) its replica would take more than
    TEACHER_REPLICA_FRACTION of a rank's memory."""
    if mode not in ("auto", "replicate", "shard"):
        raise PuzzleError(f"teacher sharding must be auto, replicate or shard, got {mode!r}")
    if mode != "auto":
        return mode == "shard"
    return teacher_bytes > TEACHER_REPLICA_FRACTION * memory


# --- the trainer ----------------------------------------------------------------------------------------

class FSDPDistiller(Distiller):
    """`Distiller` on every rank of a torchrun job; `train` is collective and returns the trained student
    (gathered, unsharded) on rank 0 and `student=None` elsewhere. The loss is `Distiller._loss`."""

    def __init__(self, teacher: PuzzleForCausalLM, student: Any, out_dir: str | Path, config: DistillConfig, *,
                 compute_dtype: torch.dtype = torch.float32, teacher_sharding: TeacherSharding = "auto",
                 cpu_offload: bool = False, **kwargs: Any) -> None:
        """`kwargs`: the rest of `Distiller`'s keywords (kept_layers, kept_channels, gradient_checkpointing)."""
        self.device = init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        check_world(config, self.world)
        self.compute_dtype, self._teacher_sharding, self._cpu_offload = compute_dtype, teacher_sharding, cpu_offload
        # no Runtime: FSDP2's MixedPrecisionPolicy casts for the forward (no autocast on top); the masters stay
        # fp32. Distiller's constructor shards (`_shard`), then builds the one optimizer over the shards.
        super().__init__(teacher, student, out_dir, config, runtime=None, **kwargs)

    def _shard(self) -> None:
        """fully_shard the student (and the hidden-loss projection) over the job's ranks, and the teacher too
        when its replica would not fit (`shard_teacher`); fully_shard replaces every parameter by its DTensor
        shard, which is what the optimizer then steps. Under cpu_offload the student trains from host memory;
        the frozen teacher has no gradients or moments to offload and stays on the device."""
        mesh = init_device_mesh(self.device.type, (self.world,))
        self.root = shard(FSDPRoot(student=self.student, projection=self.projection), self.student.model.layers,
                          mesh, self.compute_dtype, offload_policy(self._cpu_offload, self.device))
        self.teacher_root = None
        if shard_teacher(self._teacher_sharding, model_bytes(self.teacher), device_memory(self.device)):
            self.teacher_root = shard(FSDPRoot(teacher=self.teacher), self.teacher.model.layers, mesh,
                                      self.compute_dtype)
        else:
            self.teacher.to(self.device)

    def _adamw_implementation(self) -> dict[str, Any] | None:
        """torch's own choice for the DTensor shards."""
        return None

    def settings(self) -> dict[str, Any]:
        """As `Distiller.settings`, the dtype being FSDP's compute dtype (nothing added for fp32)."""
        name = dtypes.name_of(self.compute_dtype)
        return {**self.config.to_json(), **({} if name == "fp32" else {"dtype": name})}

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) inside the student's root forward (and a sharded teacher's): see FSDPRoot."""
        if self.teacher_root is not None:
            return self.root(self.teacher_root, fn, *args)
        return self.root(fn, *args)

    # --- checkpoints: DCP shards + per-rank RNG + trainer.json ----------------------------------------
    def _state(self) -> dict[str, Any]:
        model, optim = get_state_dict(self.root, self.optimizer)
        return {"model": model, "optim": optim}

    def _hash_share(self, directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
        """{name: sha256 and bytes} of every file, each rank hashing every N-th one."""
        mine = {n: {"sha256": sha256_file(directory / n), "bytes": (directory / n).stat().st_size}
                for n in names[self.rank :: self.world]}
        return {k: v for share in _all_gather(mine) for k, v in share.items()}

    def save_checkpoint(self, step: int, elapsed: float, tokens: int) -> Path:
        out = self.out_dir / CHECKPOINTS / f"step_{step:06d}"
        tmp = _broadcast(atomic_dir(out) if self.rank == 0 else None)
        try:
            dcp.save(self._state(), checkpoint_id=tmp)
            rng = {"torch": torch.get_rng_state()}
            if self.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(self.device)
            atomic_save_safetensors(tmp / f"rng_{self.rank}.safetensors", rng)
            dist.barrier()
            files = self._hash_share(tmp, sorted(p.name for p in tmp.iterdir()))
            if self.rank == 0:
                atomic_write_json(tmp / "trainer.json", {
                    "step": step, "micro_batch": step * self.config.grad_accum, "elapsed_s": elapsed,
                    "tokens": tokens, "world_size": self.world, "config": self.settings(),
                    "param_names": [n for n, _ in self.params], "files": files,
                })
                commit_dir(tmp, out)
        except BaseException:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        dist.barrier()
        if self.rank == 0:
            self._drop_old_checkpoints()
        return out

    def verify_checkpoint(self, path: Path) -> dict[str, Any]:  # type: ignore[override]
        """trainer.json once every file it lists (the DCP index among them) matches its size and sha256;
        else DamagedCheckpoint on every rank."""
        try:
            meta = json.loads((path / "trainer.json").read_text())
            files = meta["files"]
            names = sorted(files)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DamagedCheckpoint(f"trainer.json is unreadable ({err})") from None
        if METADATA not in files:
            raise DamagedCheckpoint(f"{METADATA} is not recorded (not a sharded checkpoint)")
        errors = []
        for name in names[self.rank :: self.world]:
            try:
                check_file(path, name, files[name])
            except DamagedCheckpoint as err:
                errors.append(str(err))
        errors = [e for share in _all_gather(errors) for e in share]
        if errors:
            raise DamagedCheckpoint(errors[0])
        return meta

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        meta = self.verify_checkpoint(path)
        check_resumable(meta, self.settings(), [n for n, _ in self.params], self.out_dir, path)
        state = self._state()
        try:
            dcp.load(state, checkpoint_id=path)
        except Exception as err:  # DCP gathers every rank's failure and raises it on all ranks
            raise DamagedCheckpoint(f"unreadable sharded state ({str(err).splitlines()[0]})") from None
        set_state_dict(self.root, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng_file = path / f"rng_{self.rank}.safetensors"
        if rng_file.exists():  # absent when resuming on more ranks than wrote the checkpoint
            try:
                rng = load_file(str(rng_file))
            except (SafetensorError, OSError) as err:
                raise DamagedCheckpoint(f"unreadable {rng_file.name} ({err})") from None
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        return meta

    # --- the final student ----------------------------------------------------------------------------
    def gather_student(self) -> PuzzleForCausalLM | None:
        """The trained student as one ordinary module on rank 0 (None elsewhere): the full state dict,
        gathered to rank 0's CPU, assigned into a student built on the meta device."""
        full = get_model_state_dict(self.root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        prefix = "student."
        state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        config = self.student.config
        with torch.device("meta"):
            plain = PuzzleForCausalLM(config)
        missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"gathered state does not fit the student (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
        # the one non-persistent buffer (rotary inv_freq) is not in a state dict: rebuild its module
        plain.model.rotary_emb = type(self.student.model.rotary_emb)(config=config)
        if config.tie_word_embeddings:
            plain.tie_weights()
        left = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"gathered student lacks {left[:3]}")
        return plain.eval()

    # --- the loop: Distiller.train on every rank, through these hooks ---------------------------------
    def _barrier(self) -> None:
        dist.barrier()

    @property
    def _device(self) -> torch.device:
        return self.device

    def _teacher(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) with a sharded teacher's root unit gathered (a replicated teacher needs nothing)."""
        return self.teacher_root(fn, *args) if self.teacher_root is not None else fn(*args)

    def _reduce(self, totals: dict[str, float], tokens: int) -> tuple[dict[str, float], int]:
        """The step's loss terms (this rank's means over its micro-batches) and tokens, summed over ranks."""
        keys = sorted(totals)
        summed = torch.tensor([totals[k] for k in keys] + [tokens], dtype=torch.float64, device=self.device)
        dist.all_reduce(summed)
        return dict(zip(keys, summed[:-1].tolist())), int(summed[-1].item())

    def _clip(self) -> torch.Tensor:
        norm = super()._clip()
        return norm.full_tensor() if isinstance(norm, DTensor) else norm  # the global norm, on every rank

    def _final(self) -> tuple[PuzzleForCausalLM | None, nn.Module | None]:
        """The student gathered whole on rank 0 (None elsewhere); the sharded projection is not returned."""
        return self.gather_student(), None


# --- launching ------------------------------------------------------------------------------------------

def _flags(arguments: dict[str, Any]) -> list[str]:
    """`puzzle distill` flags for keyword arguments (cli.build_parser's conventions; None = default)."""
    argv = []
    for name, value in arguments.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def launch(arguments: dict[str, Any], nproc: int) -> None:
    """Run `distill(**arguments)` on `nproc` torchrun workers on this node; the caller holds the lock."""
    args = {k: v for k, v in arguments.items() if k != "nproc"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "puzzle.distill.torchrun", *_flags(args)]
    print(f"distill: {nproc} processes (FSDP2): {' '.join(command[1:])}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        error = Path(tmp) / "error.txt"
        env = {**os.environ, LOCK_HELD_ENV: "1", ERROR_FILE_ENV: str(error)}
        code = subprocess.run(command, env=env).returncode
        if code and error.exists():
            raise PuzzleError(error.read_text())
    if code:
        raise PuzzleError(f"distill: the {nproc} torchrun workers failed (exit code {code}); their output is above")
