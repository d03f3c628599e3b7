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
"""

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

from puzzle.errors import PuzzleError

Frequencies = dict[int, tuple[float, ...]]
IMPORTANCE_FILE = Path("importance") / "importance.safetensors"  # pruning/importance.py SCORES_FILE in a run dir
_KEY = re.compile(r"layers\.(\d+)\.experts\.frequency")


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


def _from_safetensors(path: Path) -> dict[int, list[float]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            out = {int(m.group(1)): f.get_tensor(key).astype(float).tolist()
                   for key in f.keys() if (m := _KEY.fullmatch(key))}
    except (SafetensorError, OSError) as err:
        raise PuzzleError(f"{path}: cannot read ({err})") from None
    if not out:
        raise PuzzleError(f"{path}: no layers.{{i}}.experts.frequency scores (an importance run of an MoE parent has them)")
    return out


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
