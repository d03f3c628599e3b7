"""Which experts an MoE layer keeps: the highest-scoring ones by the router statistics `puzzle importance`
records (importance.py: `layers.{i}.experts.{frequency,gate,output}`, each (E,)).

Uniform expert pruning (`puzzle prune --experts N`) and library init of MoE variants read the scores through
`layer_expert_scores` / `load_expert_scores` and keep `keep_experts(scores, n)`. The default criterion is the
output-aware one (the router's weight times the size of what the expert adds, summed over the tokens routed
to it): an expert chosen often but contributing little ranks below one chosen less often that moves the
residual stream more; `frequency` and `gate` are the router-only alternatives.
"""

import re
from pathlib import Path
from typing import Literal

import torch

from puzzle.errors import PuzzleError

from .importance import load_importance
from .slicing import top_k

ExpertCriterion = Literal["output", "frequency", "gate"]
EXPERT_CRITERIA = ("output", "frequency", "gate")
_KEY = re.compile(r"layers\.(\d+)\.experts\.(frequency|gate|output)")


def keep_experts(scores: torch.Tensor, n: int) -> torch.Tensor:
    """The `n` highest-scoring experts of one layer (scores (E,)), ascending (ties: the lower index wins):
    the parent's order, so the router's rows and the experts stay aligned."""
    if not 0 < n <= scores.numel():
        raise PuzzleError(f"cannot keep {n} of {scores.numel()} experts (between 1 and {scores.numel()})")
    return top_k(scores, n)


def moe_layers(scores: dict[str, torch.Tensor]) -> list[int]:
    """The layers an importance file holds router statistics for, ascending."""
    return sorted({int(m.group(1)) for k in scores if (m := _KEY.fullmatch(k))})


def layer_expert_scores(scores: dict[str, torch.Tensor], layer: int,
                        criterion: ExpertCriterion = "output") -> torch.Tensor:
    """Layer `layer`'s (E,) expert scores by `criterion`; one line when the file has none for it (scored
    before importance recorded experts, or a dense layer)."""
    if criterion not in EXPERT_CRITERIA:
        raise PuzzleError(f"unknown expert criterion {criterion!r}; choose {', '.join(EXPERT_CRITERIA)}")
    key = f"layers.{layer}.experts.{criterion}"
    if key not in scores:
        raise PuzzleError(f"importance scores lack {key!r} (no router statistics for layer {layer}); "
                          "rerun `puzzle importance` for this MoE parent")
    return scores[key]


def load_expert_scores(run_dir: str | Path, criterion: ExpertCriterion = "output") -> dict[int, torch.Tensor]:
    """{MoE layer: (E,) scores} from RUN_DIR/importance (`puzzle importance`), by `criterion`."""
    scores = load_importance(run_dir)
    layers = moe_layers(scores)
    if not layers:
        raise PuzzleError(f"the importance scores in {run_dir} hold no router statistics; "
                          "rerun `puzzle importance` (an MoE parent's are recorded since issue 25)")
    return {i: layer_expert_scores(scores, i, criterion) for i in layers}


__all__ = ["EXPERT_CRITERIA", "ExpertCriterion", "keep_experts", "layer_expert_scores", "load_expert_scores",
           "moe_layers"]
