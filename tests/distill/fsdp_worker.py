"""torchrun worker for test_distill_fsdp.py: FSDP2 GKD of one tiny case, under OUT/NAME for each run:
  straight   uninterrupted, teacher replicated
  sharded    uninterrupted, teacher sharded too
  bf16       as `sharded`, computing in bf16 (MixedPrecisionPolicy: bf16 gathers, fp32 shards and reductions)
  resumed    stopped after STOP steps, then resumed by a fresh FSDPDistiller (fresh weights; all state from
             the sharded checkpoint)
  tied       tied input and output embeddings (SmolLM2's layout), a 2-layer student of the same width
  offload    as `straight`, the student under FSDP2's CPUOffloadPolicy (shards, gradients, moments on the host)
  offload-resumed  as `resumed`, both halves under CPUOffloadPolicy
  damaged    a copy of `straight` with a flipped byte in rank 1's shard of its last checkpoint, resumed: it
             falls back to the checkpoint before and recomputes the steps since
Rank 0 writes each run's final student as OUT/NAME/final.safetensors.

Usage: torchrun --standalone --nproc-per-node 2 tests/distill/fsdp_worker.py OUT
"""

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # conftest

import torch  # noqa: E402
from conftest import make_llama  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from puzzle.distill.trainer import DistillConfig  # noqa: E402
from puzzle.model.checkpoint import to_puzzle  # noqa: E402
from puzzle.pruning.importance import compute_importance  # noqa: E402
from puzzle.pruning.prune import PrunePlan, prune_model  # noqa: E402

# grad_accum 2 over 2 ranks: one micro-batch each; the cosine hidden loss through a learned projection
# (hidden 48 -> 64) puts a non-layer module into the root unit; lm_weight adds the LM term.
CONFIG = DistillConfig(steps=6, batch_size=4, grad_accum=2, lr=2e-3, min_lr=2e-4, warmup_steps=2, val_every=3,
                       checkpoint_every=2, hidden_loss="cosine", lm_weight=0.5)
STOP = 3  # the last checkpoint before it is step 2: step 3 is recomputed on resume


def case():
    """A fresh teacher, a width- and depth-pruned student with its pruning record, train and val blocks."""
    gen = torch.Generator().manual_seed(0)
    train = torch.randint(3, 320, (32, 16), generator=gen)
    val = torch.randint(3, 320, (4, 16), generator=gen)
    teacher = to_puzzle(make_llama())
    scores = compute_importance(teacher, [train[:8]], progress=False)
    student, record = prune_model(teacher, scores, PrunePlan(hidden_size=48, intermediate_size=64, drop_layers=(1, 2)))
    kept = dict(kept_layers=record["kept_layers"], kept_channels=record["channels"])
    return teacher, student, kept, train, val


def tied_case():
    """As `case`, with tied embeddings in both models and a student that is not pruned from the teacher."""
    _, _, _, train, val = case()
    teacher = to_puzzle(make_llama(tie_word_embeddings=True))
    student = to_puzzle(make_llama(seed=1, num_hidden_layers=2, tie_word_embeddings=True))
    return teacher, student, {}, train, val


def run(out: Path, *, stop_after: int | None = None, make=case, **kwargs):
    from puzzle.distill.fsdp import FSDPDistiller

    teacher, student, kept, train, val = make()
    result = FSDPDistiller(teacher, student, out, CONFIG, **kept, **kwargs).train(
        train, val, progress=False, stop_after=stop_after)
    if result.student is not None:
        if result.student.config.tie_word_embeddings:
            assert result.student.lm_head.weight is result.student.model.embed_tokens.weight
        save_file({k: v.clone() for k, v in result.student.state_dict().items()}, out / "final.safetensors")
    return result


def main(out: Path) -> None:
    run(out / "straight", teacher_sharding="replicate")
    run(out / "sharded", teacher_sharding="shard")
    run(out / "bf16", teacher_sharding="shard", compute_dtype=torch.bfloat16)
    run(out / "resumed", teacher_sharding="replicate", stop_after=STOP)
    if torch.distributed.get_rank() == 0:  # the stopped run's log, to tell a resume from a restart
        shutil.copy(out / "resumed" / "log.jsonl", out / "stopped.jsonl")
    run(out / "resumed", teacher_sharding="replicate")
    run(out / "tied", teacher_sharding="shard", make=tied_case)
    run(out / "offload", teacher_sharding="replicate", cpu_offload=True)
    run(out / "offload-resumed", teacher_sharding="replicate", cpu_offload=True, stop_after=STOP)
    run(out / "offload-resumed", teacher_sharding="replicate", cpu_offload=True)
    if torch.distributed.get_rank() == 0:
        shutil.copytree(out / "straight", out / "damaged")
        shard = out / "damaged" / "checkpoints" / f"step_{CONFIG.steps:06d}" / "__1_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x40
        shard.write_bytes(bytes(data))
    torch.distributed.barrier()
    run(out / "damaged", teacher_sharding="replicate")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
