"""Measured MoE routing for the roofline: how often each expert of each layer is chosen.

The roofline prices an MoE decode step by the experts its batch touches (`puzzle.shape.expected_experts`):
uniform routing unless it is given each layer's measured selection frequencies, in one interface:

    {layer index: [f_0, ..., f_{E-1}]}      one float per expert, any scale (p_j = k f_j / sum f)

`read_expert_frequencies` returns that mapping from any of
  - a mapping already in that form (a Python caller, e.g. a profile argument);
  - a JSON file: {"0": [...], "1": [...]}, or the same under a top-level "layers" key;
  - the importance stage's scores (`puzzle importance`: run_dir/importance/importance.safetensors, keys
    `layers.{i}.experts.frequency`, each (E,), the fraction of calibration tokens that chose each expert
    among their top-k, summing to k), given as that file or as the run directory.
`roofline.predict_model_costs(..., frequencies=...)` and `sublayer_costs(..., frequencies=...)` take it; a layer
it does not name, or whose expert count differs from the block's (an expert-pruned child), routes uniformly.
`kept_frequencies` gives an expert-pruned variant its own: the parent's over the experts it keeps, renormalised
(`puzzle profile` reads the kept experts from the library's entries, commands.py `expert_routing`).
"""

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from puzzle.errors import PuzzleError

Frequencies = dict[int, tuple[float, ...]]
IMPORTANCE_FILE = Path("importance") / "importance.safetensors"  # pruning/importance.py SCORES_FILE in a run dir


def read_expert_frequencies(source: str | Path | Mapping[Any, Any] | None) -> Frequencies:
    """Each layer's expert selection frequencies from a mapping, a JSON file, an importance.safetensors or
    a run directory holding one (module docstring); {} for None. A malformed source is one PuzzleError line."""
    if source is None:
        return {}
    if isinstance(source, Mapping):
        return _validated(source, "expert frequencies")
    path = Path(source)
    if path.is_dir():
        path = path / IMPORTANCE_FILE
    if not path.exists():
        raise PuzzleError(f"expert frequencies not found: {path}")
    if path.suffix == ".safetensors":
        return _validated(_from_safetensors(path), str(path))
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PuzzleError(f"{path}: cannot read expert frequencies as JSON ({err})") from None
    if isinstance(raw, dict) and isinstance(raw.get("layers"), dict):
        raw = raw["layers"]
    if not isinstance(raw, dict):
        raise PuzzleError(f"{path}: expected {{layer: [frequency per expert]}}, got {type(raw).__name__}")
    return _validated(raw, str(path))


def importance_frequencies(scores: Mapping[str, Any]) -> dict[int, list[float]]:
    """{layer: its experts' selection frequencies} of `puzzle importance`'s scores (the key format is
    pruning/experts.py's); {} when they hold no router statistics (a dense parent, or scored before them)."""
    from puzzle.pruning.experts import layer_expert_scores, moe_layers

    return {i: layer_expert_scores(scores, i, "frequency").float().tolist() for i in moe_layers(scores)}


def _from_safetensors(path: Path) -> dict[int, list[float]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        out = importance_frequencies(load_file(str(path)))
    except (SafetensorError, OSError) as err:
        raise PuzzleError(f"{path}: cannot read ({err})") from None
    if not out:
        raise PuzzleError(f"{path}: no layers.{{i}}.experts.frequency scores (an importance run of an MoE parent has them)")
    return out


def kept_frequencies(parent: Sequence[float], kept: Sequence[int] | None, top_k: int) -> tuple[float, ...] | None:
    """A variant's expert frequencies from its parent layer's (E,): those of the experts it keeps (`kept`, parent
    indices in the child's order, as the library records them; None: all E in order), renormalised to sum to the
    variant's top-k (importance.py's scale: the fraction of tokens choosing each expert). The tokens a dropped
    expert took are assumed to spread over the kept ones in proportion to their own frequencies. None (uniform)
    when the kept experts were never chosen."""
    chosen = [float(parent[j]) for j in (range(len(parent)) if kept is None else kept)]
    total = sum(chosen)
    if total <= 0:
        return None
    return tuple(top_k * f / total for f in chosen)


def _validated(raw: Mapping[Any, Any], where: str) -> Frequencies:
    out = {}
    for layer, values in raw.items():
        try:
            index = int(layer)
        except (TypeError, ValueError):
            raise PuzzleError(f"{where}: layer {layer!r} is not a layer index") from None
        if index < 0 or isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise PuzzleError(f"{where}: layer {layer!r} needs a list of frequencies, one per expert")
        try:
            floats = tuple(float(v) for v in values)
        except (TypeError, ValueError):
            raise PuzzleError(f"{where}: layer {layer}: frequencies must be numbers") from None
        if not floats or any(not math.isfinite(v) or v < 0 for v in floats) or sum(floats) <= 0:
            raise PuzzleError(f"{where}: layer {layer}: frequencies must be finite, non-negative and not all zero")
        out[index] = floats
    return out
