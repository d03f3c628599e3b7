"""What the training recipes share: BLD (puzzle/library/bld.py, every variant of a layer group in lockstep)
and GKD (puzzle/distill/trainer.py, and its FSDP2 form in puzzle/distill/fsdp.py) build their AdamW, its
learning-rate schedule, their shuffled batch stream and their periodic actions (a log record, a
validation, a checkpoint) from here, as torchtune's recipes share its `training/` package.

    adamw / param_groups  AdamW with weight decay on matrices only (norm gains and biases are scale and
                          offset parameters: no decay on them, as in litgpt and nanoGPT)
    cosine_lr             linear warm-up over `warmup` optimizer steps to `peak`, then a cosine to `floor`;
                          warm-up is counted in steps: BLD's setting is a fraction of its steps, converted
                          once by `warmup_steps`
    BatchStream           batch i of an endless stream of per-epoch shuffles, by index: the same batch
                          whatever was read before, so a resumed run reads on exactly
    due                   whether a periodic action falls on this step

Each recipe keeps the numbers it computed before this module existed, bit for bit: GKD's lr is
cosine_lr(peak=lr, floor=min_lr) itself, BLD's is its LambdaLR's factor cosine_lr(peak=1, floor=ratio)
times lr (the same expression evaluated in the same order), and each recipe keeps its data order
(`BatchStream`'s two forms).
"""

import math
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from puzzle.data.blocks import rows, shuffled
from puzzle.errors import PuzzleError

BETAS = (0.9, 0.95)  # both recipes' AdamW betas (GKD records them in its config)


def param_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's two groups, in this order: the matrices (decayed) and the rest (not decayed)."""
    params = list(params)
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def adamw(params: Iterable[nn.Parameter], *, lr: float, weight_decay: float,
          betas: tuple[float, float] = BETAS, implementation: dict[str, Any] | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups(params)`. `implementation`: torch's `fused` / `foreach` switch
    (`Runtime.adamw_kwargs()`: fused on CUDA, foreach on the CPU); None leaves torch's own choice."""
    return torch.optim.AdamW(param_groups(params, weight_decay), lr=lr, betas=betas, **(implementation or {}))


def warmup_steps(steps: int, fraction: float) -> int:
    """A warm-up given as a fraction of `steps`, in steps: at least 1 when there is more than one step."""
    return max(1, round(steps * fraction)) if steps > 1 else 0


def cosine_lr(step: int, *, steps: int, warmup: int, peak: float, floor: float) -> float:
    """The learning rate of optimizer step `step` (0-based) of `steps`: linear warm-up to `peak` over the
    first `warmup` steps, then a cosine from `peak` down to `floor`, reached at `steps` and held after."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def due(count: int, every: int, last: int) -> bool:
    """Whether a periodic action falls on `count`: every `every`-th one, and always the `last`."""
    return count % every == 0 or count == last


def pair_seed(seed: int, epoch: int) -> list[int]:
    """GKD's epoch seed: numpy's SeedSequence of (seed, epoch)."""
    return [seed, epoch]


def sum_seed(seed: int, epoch: int) -> int:
    """BLD's epoch seed: seed + epoch (its data order since the first libraries; a library is one recipe,
    so a variant trained after a change of order would not be comparable with one trained before)."""
    return seed + epoch


class BatchStream:
    """Batch i of an endless stream of shuffled epochs of `blocks` ((n, T) token ids: a memmap, an array),
    as an int64 tensor (B, T); epoch e is the permutation seeded by `epoch_seed(seed, e)`.

    straddle=True (GKD): batch i is positions [i*B, (i+1)*B) of the epochs laid end to end, so a batch may
    take the end of one epoch and the start of the next. straddle=False (BLD): each epoch yields its full
    batches only (B capped at n), the rest of it left out."""

    def __init__(self, blocks: Any, batch_size: int, seed: int, *, straddle: bool = True,
                 epoch_seed: Callable[[int, int], Any] = pair_seed) -> None:
        if len(blocks) == 0:
            raise PuzzleError("no training blocks")
        self.blocks, self.seed, self.straddle, self.epoch_seed = blocks, seed, straddle, epoch_seed
        self.batch_size = batch_size if straddle else min(batch_size, len(blocks))
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms[epoch] = shuffled(len(self.blocks), self.epoch_seed(self.seed, epoch))
        return self._perms[epoch]

    def __getitem__(self, index: int) -> torch.Tensor:
        n, b = len(self.blocks), self.batch_size
        if self.straddle:
            picked = [int(self._perm(pos // n)[pos % n]) for pos in range(index * b, (index + 1) * b)]
            return rows(self.blocks, picked)
        epoch, j = divmod(index, n // b)
        return rows(self.blocks, self._perm(epoch)[j * b : (j + 1) * b])

    def __iter__(self) -> Iterator[torch.Tensor]:
        index = 0
        while True:
            yield self[index]
            index += 1
