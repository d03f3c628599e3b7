"""The search problem as plain data: per layer, the attention and FFN variants with their quality cost
and hardware costs, the workload, and the user's constraints. No solver in here.

Formulation (documented choice): one binary per (layer, attention variant) and one per (layer, FFN
variant), exactly one of each per layer. The Puzzle paper uses one binary per (layer, attention, FFN)
pair; because every quantity we use is a sum over sublayers (replace-1-block scores are measured one
sublayer at a time, costs are profiled one sublayer at a time), the pair formulation has the same
optimum with |A| x |F| instead of |A| + |F| variables per layer.

Quantities of a choice (all linear in the binaries):
  quality     sum of the selected metric's degradation from the parent, per sublayer (the objective)
  params      fixed params (embeddings, final norm, LM head) + sum of sublayer params
  memory      fixed param bytes + fixed KV bytes + sum of sublayer param bytes and KV cache bytes
              (KV cache at the workload's batch size and context)
  time        total time of one workload batch: prefill_s + output_len * decode_s, each the fixed
              part plus the sum over sublayers
  throughput  batch_size * output_len / time (generated tokens per second); a floor on it is the
              linear constraint time <= batch_size * output_len / floor
  latency     the same time in ms: how long one request of the workload batch takes from its prompt
              to its last generated token (prefill + output_len decode steps)
"""

import math
from dataclasses import dataclass, replace
from typing import Any, Iterable

import pandas as pd

from puzzle.errors import PuzzleError
from puzzle.model.blocks import AttentionConfig, BlockConfig, BlockConfigError, FFNConfig, sublayer_from_name
from puzzle.units import GIB

KINDS = ("attention", "ffn")
# Scores where higher is better; the objective minimises the drop from the parent for these.
HIGHER_IS_BETTER = {"top1_agreement", "cosine"}
COST_COLUMNS = ("params", "param_bytes", "kv_cache_bytes", "prefill_s", "decode_s")
# Limits in the order the infeasibility diagnosis prefers to name them.
LIMIT_NAMES = ("throughput", "latency", "memory", "params")

Selection = tuple[tuple[int, int], ...]  # per layer: (attention option index, ffn option index)


@dataclass(frozen=True)
class Option:
    """One variant of one sublayer: its quality cost and its hardware costs at the problem's batch."""

    name: str
    quality: float  # degradation of the metric vs the parent's variant (0 for the parent)
    params: int
    param_bytes: int
    kv_cache_bytes: int
    prefill_s: float  # whole workload prefill, this sublayer
    decode_s: float  # one decode step of the whole batch, this sublayer
    is_parent: bool = False
    score: float = 0.0  # the metric's raw value, for reports


@dataclass(frozen=True)
class LayerOptions:
    attention: tuple[Option, ...]
    ffn: tuple[Option, ...]

    def parent(self) -> tuple[int, int]:
        return (
            next(i for i, o in enumerate(self.attention) if o.is_parent),
            next(i for i, o in enumerate(self.ffn) if o.is_parent),
        )


@dataclass(frozen=True)
class Workload:
    batch_size: int
    input_len: int
    output_len: int


@dataclass(frozen=True)
class FixedCosts:
    """Costs outside the searched layers: embeddings, final norm, LM head."""

    params: int = 0
    param_bytes: int = 0
    kv_cache_bytes: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0


@dataclass(frozen=True)
class Constraints:
    """A budget in the user's units; None means unconstrained. `speedup` is relative to the parent's
    throughput on the same profile at the workload's batch size; with `throughput` too, the stricter
    floor applies."""

    speedup: float | None = None
    throughput: float | None = None  # generated tokens / s
    memory_gib: float | None = None
    latency_ms: float | None = None
    max_params: float | None = None

    def __post_init__(self) -> None:
        for name in ("speedup", "throughput", "memory_gib", "latency_ms", "max_params"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise PuzzleError(f"constraint {name} must be a positive number, got {value!r}")

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class Limit:
    """One constraint as `quantity <= bound` in the quantity's own units (time_s, memory_bytes, params)."""

    name: str  # one of LIMIT_NAMES
    quantity: str  # "time_s" | "memory_bytes" | "params"
    bound: float


@dataclass(frozen=True)
class Prediction:
    """Everything the cost model predicts for one choice; computed in plain Python (exact sums)."""

    quality: float
    params: int
    param_bytes: int
    kv_cache_bytes: int
    memory_bytes: int
    prefill_s: float
    decode_s: float  # one decode step, whole model
    time_s: float
    throughput: float
    latency_ms: float
    speedup: float
    batch_size: int

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["memory_gib"] = self.memory_gib
        return out


@dataclass(frozen=True)
class SolverProblem:
    layers: tuple[LayerOptions, ...]
    workload: Workload
    fixed: FixedCosts
    metric: str = "kl"
    profile: str = ""
    hidden_size: int | None = None  # for ffn_mult in block_configs; None writes ffn_mult null
    # Parent throughput on this profile at the workload's batch: the reference of `speedup` (fixed
    # when the problem is re-costed for another batch size).
    reference_throughput: float | None = None
    reference_batch_size: int | None = None

    def __post_init__(self) -> None:
        if not self.layers:
            raise PuzzleError("the search space has no layers")
        for i, layer in enumerate(self.layers):
            for kind, options in zip(KINDS, (layer.attention, layer.ffn)):
                if not options:
                    raise PuzzleError(f"layer {i} has no {kind} variant")
                if sum(o.is_parent for o in options) != 1:
                    raise PuzzleError(f"layer {i} {kind}: expected exactly one parent variant")
            # Every name must map to a block config; fail here, not after a long solve.
            for kind, options in zip(KINDS, (layer.attention, layer.ffn)):
                for o in options:
                    option_config(kind, i, o)
        if self.reference_throughput is None:
            object.__setattr__(self, "reference_throughput", self.evaluate(self.parent_selection()).throughput)
            object.__setattr__(self, "reference_batch_size", self.workload.batch_size)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def batch_size(self) -> int:
        return self.workload.batch_size

    def parent_selection(self) -> Selection:
        return tuple(layer.parent() for layer in self.layers)

    def options(self, layer: int, kind: str) -> tuple[Option, ...]:
        return self.layers[layer].attention if kind == "attention" else self.layers[layer].ffn

    # ---- quantities ---------------------------------------------------------------------------
    def option_value(self, option: Option, quantity: str) -> float:
        """Contribution of one option to a linear quantity (the MIP coefficient)."""
        if quantity == "quality":
            return option.quality
        if quantity == "params":
            return option.params
        if quantity == "memory_bytes":
            return option.param_bytes + option.kv_cache_bytes
        if quantity == "time_s":
            return option.prefill_s + self.workload.output_len * option.decode_s
        raise ValueError(f"unknown quantity {quantity!r}")

    def constant(self, quantity: str) -> float:
        """The part of a quantity no choice changes (fixed costs)."""
        f = self.fixed
        return {
            "quality": 0.0,
            "params": f.params,
            "memory_bytes": f.param_bytes + f.kv_cache_bytes,
            "time_s": f.prefill_s + self.workload.output_len * f.decode_s,
        }[quantity]

    def evaluate(self, selection: Selection) -> Prediction:
        """Recompute every quantity of a choice from the tables (the independent check of a solution)."""
        if len(selection) != self.num_layers:
            raise ValueError(f"selection has {len(selection)} layers, problem has {self.num_layers}")
        chosen = [o for layer, (a, f) in zip(self.layers, selection) for o in (layer.attention[a], layer.ffn[f])]
        fixed = self.fixed
        params = fixed.params + sum(o.params for o in chosen)
        param_bytes = fixed.param_bytes + sum(o.param_bytes for o in chosen)
        kv = fixed.kv_cache_bytes + sum(o.kv_cache_bytes for o in chosen)
        prefill = math.fsum([fixed.prefill_s] + [o.prefill_s for o in chosen])
        decode = math.fsum([fixed.decode_s] + [o.decode_s for o in chosen])
        time_s = prefill + self.workload.output_len * decode
        throughput = self.workload.batch_size * self.workload.output_len / time_s if time_s > 0 else math.inf
        return Prediction(
            quality=math.fsum(o.quality for o in chosen),
            params=params,
            param_bytes=param_bytes,
            kv_cache_bytes=kv,
            memory_bytes=param_bytes + kv,
            prefill_s=prefill,
            decode_s=decode,
            time_s=time_s,
            throughput=throughput,
            latency_ms=time_s * 1e3,
            speedup=throughput / self.reference_throughput if self.reference_throughput else math.nan,
            batch_size=self.workload.batch_size,
        )

    # ---- constraints ----------------------------------------------------------------------------
    def throughput_floor(self, constraints: Constraints) -> float | None:
        floors = [constraints.throughput] if constraints.throughput else []
        if constraints.speedup:
            floors.append(constraints.speedup * self.reference_throughput)
        return max(floors) if floors else None

    def limits(self, constraints: Constraints) -> list[Limit]:
        """The constraints as linear upper bounds, in LIMIT_NAMES order."""
        out = []
        floor = self.throughput_floor(constraints)
        if floor:
            out.append(Limit("throughput", "time_s", self.workload.batch_size * self.workload.output_len / floor))
        if constraints.latency_ms:
            out.append(Limit("latency", "time_s", constraints.latency_ms / 1e3))
        if constraints.memory_gib:
            out.append(Limit("memory", "memory_bytes", constraints.memory_gib * GIB))
        if constraints.max_params:
            out.append(Limit("params", "params", constraints.max_params))
        return out

    def violations(self, prediction: Prediction, constraints: Constraints) -> dict[str, float]:
        """Constraints a prediction breaks, with by how much (in the limit's quantity); exact comparisons
        in the user's own terms, so a budget is never exceeded through rounding in the solver."""
        out = {}
        floor = self.throughput_floor(constraints)
        if floor and not prediction.throughput >= floor:
            bound = self.workload.batch_size * self.workload.output_len / floor
            out["throughput"] = max(prediction.time_s - bound, 0.0)
        if constraints.latency_ms and not prediction.latency_ms <= constraints.latency_ms:
            out["latency"] = prediction.time_s - constraints.latency_ms / 1e3
        if constraints.memory_gib and not prediction.memory_bytes <= constraints.memory_gib * GIB:
            out["memory"] = prediction.memory_bytes - constraints.memory_gib * GIB
        if constraints.max_params and not prediction.params <= constraints.max_params:
            out["params"] = prediction.params - constraints.max_params
        return out

    def min_value(self, quantity: str) -> float:
        """The smallest value of a quantity over all choices, ignoring every constraint."""
        total = self.constant(quantity)
        for layer in self.layers:
            for options in (layer.attention, layer.ffn):
                total += min(self.option_value(o, quantity) for o in options)
        return total

    # ---- batch size ---------------------------------------------------------------------------
    def at_batch(self, batch_size: int) -> "SolverProblem":
        """The same problem re-costed for another batch size (an approximation; see `scale_costs`)."""
        if batch_size == self.workload.batch_size:
            return self
        ratio = batch_size / self.workload.batch_size
        layers = tuple(
            LayerOptions(tuple(scale_costs(o, ratio) for o in layer.attention), tuple(scale_costs(o, ratio) for o in layer.ffn))
            for layer in self.layers
        )
        fixed = FixedCosts(
            params=self.fixed.params,
            param_bytes=self.fixed.param_bytes,
            kv_cache_bytes=math.ceil(self.fixed.kv_cache_bytes * ratio),
            prefill_s=self.fixed.prefill_s * ratio,
            decode_s=self.fixed.decode_s,
        )
        return replace(self, layers=layers, fixed=fixed, workload=replace(self.workload, batch_size=batch_size))

    # ---- output -------------------------------------------------------------------------------
    def choices(self, selection: Selection) -> list[dict[str, Any]]:
        return [
            {"layer": i, "attention": layer.attention[a].name, "ffn": layer.ffn[f].name}
            for i, (layer, (a, f)) in enumerate(zip(self.layers, selection))
        ]

    def blocks(self, selection: Selection) -> list[BlockConfig]:
        return [
            BlockConfig(option_config("attention", i, layer.attention[a]), option_config("ffn", i, layer.ffn[f]))
            for i, (layer, (a, f)) in enumerate(zip(self.layers, selection))
        ]

    def block_configs(self, selection: Selection) -> list[dict[str, Any]]:
        """The `block_configs` of a choice (ffn_mult null when the problem has no hidden size)."""
        return [block.to_dict(self.hidden_size) for block in self.blocks(selection)]


def option_config(kind: str, layer: int, option: Option) -> AttentionConfig | FFNConfig:
    """The typed config of an option, from its canonical name (no torch import: `solve` stays fast)."""
    try:
        return sublayer_from_name(kind, option.name)
    except BlockConfigError as err:
        raise PuzzleError(f"layer {layer}: {err}") from None


def scale_costs(option: Option, ratio: float) -> Option:
    """Costs at batch `ratio` x the workload's. Prefill work and the KV cache grow linearly with the
    batch; the decode step is kept as measured: decode is bound by reading the weights (and KV), so
    its time grows far slower than the batch. This is optimistic for batches well above the
    profiled one; a costs table with a `batch_size` column gives exact rows instead."""
    return replace(
        option,
        kv_cache_bytes=math.ceil(option.kv_cache_bytes * ratio),
        prefill_s=option.prefill_s * ratio,
    )


# ---- building a problem from the run directory's tables ---------------------------------------
def _require_columns(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise PuzzleError(f"{what} lacks column(s) {', '.join(missing)}")


def problem_from_tables(
    scores: pd.DataFrame,
    costs: pd.DataFrame,
    workload: Workload,
    fixed: FixedCosts,
    metric: str = "kl",
    profile: str = "",
    hidden_size: int | None = None,
    batch_size: int | None = None,
) -> SolverProblem:
    """Join the scores table and a profile's costs table (contracts in docs/contracts.md) into a problem.

    The parent's variant per (layer, kind) is the costs row with `is_parent` true (or, without that
    column, the scores row with kl == 0). The quality cost of a variant is its metric's degradation
    from the parent's: `metric - parent` (or `parent - metric` for scores where higher is better).
    `batch_size` re-costs the problem for another batch: the costs table's rows at that batch when it
    has a `batch_size` column holding it, else `SolverProblem.at_batch`. `speedup` stays relative to
    the parent at the workload's batch either way.
    """
    key = ["layer", "kind", "variant"]
    _require_columns(scores, key, "scores table")
    _require_columns(costs, key + list(COST_COLUMNS), "costs table")
    if metric not in scores.columns or metric in key:
        numeric = [c for c in scores.columns if c not in key and pd.api.types.is_numeric_dtype(scores[c])]
        raise PuzzleError(f"unknown metric {metric!r}; the scores table has {', '.join(numeric)}")
    if not pd.api.types.is_numeric_dtype(scores[metric]):
        raise PuzzleError(f"metric {metric!r} is not numeric in the scores table")
    if batch_size is not None and batch_size <= 0:
        raise PuzzleError(f"batch sizes must be positive, got {batch_size}")

    def rows_at(batch: int) -> pd.DataFrame | None:
        if "batch_size" not in costs.columns:
            return costs if batch == workload.batch_size else None
        rows = costs[costs["batch_size"] == batch]
        return rows.drop(columns="batch_size") if not rows.empty else None

    base_rows = rows_at(workload.batch_size)
    if base_rows is None:
        raise PuzzleError(f"costs table has no rows at the workload batch size {workload.batch_size}")
    base = _build(scores, base_rows, workload, fixed, metric, profile, hidden_size)
    if batch_size is None or batch_size == workload.batch_size:
        return base
    exact = rows_at(batch_size)
    if exact is None:
        return base.at_batch(batch_size)
    scaled_fixed = base.at_batch(batch_size).fixed
    other = _build(scores, exact, replace(workload, batch_size=batch_size), scaled_fixed, metric, profile, hidden_size)
    return replace(other, reference_throughput=base.reference_throughput, reference_batch_size=base.reference_batch_size)


def _build(
    scores: pd.DataFrame,
    costs: pd.DataFrame,
    workload: Workload,
    fixed: FixedCosts,
    metric: str,
    profile: str,
    hidden_size: int | None,
) -> SolverProblem:
    key = ["layer", "kind", "variant"]
    for name, df in (("scores", scores), ("costs", costs)):
        dup = df.duplicated(key)
        if dup.any():
            row = df[dup].iloc[0]
            raise PuzzleError(f"{name} table has two rows for layer {row.layer} {row.kind} {row.variant}")
    extra = ["kl"] if "kl" in scores.columns and metric != "kl" else []
    merged = scores[key + [metric] + extra].merge(costs, on=key, how="outer", indicator=True)
    for side, label in (("left_only", "a score but no cost"), ("right_only", "a cost but no score")):
        orphan = merged[merged["_merge"] == side]
        if not orphan.empty:
            row = orphan.iloc[0]
            raise PuzzleError(
                f"layer {row.layer} {row.kind} {row.variant} has {label} "
                f"({len(orphan)} such row(s)); score and profile the same search space"
            )
    if merged[metric].isna().any():
        row = merged[merged[metric].isna()].iloc[0]
        raise PuzzleError(f"metric {metric!r} is missing for layer {row.layer} {row.kind} {row.variant}")
    bad_kind = set(merged["kind"]) - set(KINDS)
    if bad_kind:
        raise PuzzleError(f"unknown kind(s) {sorted(bad_kind)} in the tables (expected attention, ffn)")
    if "is_parent" in merged.columns:
        merged["is_parent"] = merged["is_parent"].fillna(False).astype(bool)
    elif "kl" in merged.columns:
        merged["is_parent"] = merged["kl"] == 0
    else:
        raise PuzzleError("costs table lacks the is_parent column and the scores have no kl to find the parent")

    sign = -1.0 if metric in HIGHER_IS_BETTER else 1.0
    groups = {k: g for k, g in merged.groupby(["layer", "kind"], sort=True)}
    num_layers = int(merged["layer"].max()) + 1
    layers = []
    for layer in range(num_layers):
        per_kind = []
        for kind in KINDS:
            rows = groups.get((layer, kind))
            if rows is None:
                raise PuzzleError(f"layer {layer} has no {kind} variant in the tables")
            parents = rows[rows["is_parent"]]
            if len(parents) != 1:
                raise PuzzleError(f"layer {layer} {kind}: expected one parent variant, found {len(parents)}")
            parent_score = float(parents[metric].iloc[0])
            rows = rows.sort_values(["is_parent", "variant"], ascending=[False, True])
            per_kind.append(
                tuple(
                    Option(
                        name=str(r["variant"]),
                        quality=sign * (float(r[metric]) - parent_score),
                        params=int(r["params"]),
                        param_bytes=int(r["param_bytes"]),
                        kv_cache_bytes=int(r["kv_cache_bytes"]),
                        prefill_s=float(r["prefill_s"]),
                        decode_s=float(r["decode_s"]),
                        is_parent=bool(r["is_parent"]),
                        score=float(r[metric]),
                    )
                    for r in rows.to_dict("records")
                )
            )
        layers.append(LayerOptions(*per_kind))
    return SolverProblem(tuple(layers), workload, fixed, metric=metric, profile=profile, hidden_size=hidden_size)
