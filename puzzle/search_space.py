"""Search spaces: which attention and FFN variants each layer of a parent may take.

A space is a YAML file (search_spaces/*.yaml) resolved against a parent config into concrete
`AttentionConfig` / `FFNConfig` lists per layer. Schema (every key optional unless noted):

    name: llama_default
    target_engine: vllm     # transformers (default: everything) | vllm | sglang | trtllm | llamacpp:
                            # FFN widths snapped to the engine's ffn_mult grid, variants it lacks
                            # dropped, each with a one-line note (puzzle/engines.py holds the rules)
    attention:
      kv_heads: halves      # "halves": the parent's KV heads, halved down to 1 (only counts that divide
                            # the query heads); "all": the parent's only; or a list of ints
      windows: [128, 512]   # sliding-window variants (gpt-oss-puzzle's selective window attention): each GQA
                            # variant again with each window W (query t sees keys in (t - W, t]), where W is
                            # below the layer's own (a parent layer with a window keeps it on every variant)
      linear: true          # attention replaced by a per-token hidden->hidden linear map
      no_op: true           # attention removed
    ffn:
      ratios: [1.0, 0.5]    # of the parent's intermediate size; or `sizes: [1536, 768]`
      round_to: 1           # round sizes to a multiple of this (e.g. 64 for tensor cores)
      linear: true
      no_op: true
      moe:                  # an MoE layer's variants (the dense keys above apply to its dense layers)
        expert_ratios: [1.0, 0.5]       # of the parent's experts kept (which ones: library/init.py)
        top_k: [2, 1]                   # experts per token (default: the parent's); only those <= experts kept
        expert_width_ratios: [1.0, 0.5] # of an expert's width (rounded to `round_to`)
    overrides:              # later entries win; layers may be negative (from the end)
      - layers: [0, -1]
        attention: {kv_heads: all, linear: false, no_op: false}
        ffn: {ratios: [1.0], linear: false, no_op: false}

The parent's own variant is always included, so every space contains the parent (a target engine that
cannot serve the parent's own blocks is refused). An MoE parent's FFN differs by layer (Qwen-MoE's dense
`mlp_only_layers`): each layer's variants start from that layer's own FFN (`SearchSpace.parent_ffns`). An MoE
variant keeps the shared expert as it is; its linear and no-op variants are the dense ones.
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from puzzle.engines import DEFAULT_ENGINE, RULES, Engine, check_family, get_engine, sublayer_violations
from puzzle.errors import PuzzleError
from puzzle.io import read_yaml
from puzzle.model.blocks import (AttentionConfig, BlockConfigError, FFNConfig, MoEConfig, on_ffn_mult_grid,
                                 snap_to_ffn_mult_grid)
from puzzle.model.family import config_family, is_hybrid
from puzzle.run_dir import RunDir
from puzzle.shape import ModelShape

SPACES_DIR = Path(__file__).resolve().parents[1] / "search_spaces"
Kind = Literal["attention", "ffn"]
_ATT_KEYS = {"kv_heads", "windows", "linear", "no_op"}
_FFN_KEYS = {"ratios", "sizes", "round_to", "linear", "no_op", "moe"}
_MOE_KEYS = {"expert_ratios", "top_k", "expert_width_ratios"}


@dataclass(frozen=True)
class Variant:
    layer: int
    kind: Kind
    config: AttentionConfig | FFNConfig
    is_parent: bool

    @property
    def name(self) -> str:
        return self.config.name


@dataclass(frozen=True)
class SearchSpace:
    name: str
    num_layers: int
    parent_attention: AttentionConfig  # the parent GQA without a window (its KV heads)
    parent_ffns: tuple[FFNConfig, ...]  # [layer] -> the parent FFN there (an MoE parent differs by layer)
    attention: tuple[tuple[AttentionConfig, ...], ...]  # [layer] -> variants, parent first
    ffn: tuple[tuple[FFNConfig, ...], ...]
    target_engine: str = DEFAULT_ENGINE
    notes: tuple[str, ...] = ()  # what fitting the space to its target engine changed, one line each
    # the parent's attention in each layer (with that layer's window); empty: `parent_attention` everywhere
    parent_attentions: tuple[AttentionConfig, ...] = ()

    def parent_attention_of(self, layer: int) -> AttentionConfig:
        return self.parent_attentions[layer] if self.parent_attentions else self.parent_attention

    @property
    def parent_ffn(self) -> FFNConfig:
        """The parent's FFN, the same in every layer (ValueError for an MoE parent whose layers differ)."""
        if len(set(self.parent_ffns)) != 1:
            raise ValueError(f"the parent's FFN differs by layer ({', '.join(sorted({f.name for f in self.parent_ffns}))})")
        return self.parent_ffns[0]

    def attention_variants(self, layer: int) -> list[AttentionConfig]:
        return list(self.attention[layer])

    def ffn_variants(self, layer: int) -> list[FFNConfig]:
        return list(self.ffn[layer])

    def variants(self, kinds: tuple[Kind, ...] = ("attention", "ffn")) -> Iterator[Variant]:
        for layer in range(self.num_layers):
            if "attention" in kinds:
                for cfg in self.attention[layer]:
                    yield Variant(layer, "attention", cfg, cfg == self.parent_attention_of(layer))
            if "ffn" in kinds:
                for cfg in self.ffn[layer]:
                    yield Variant(layer, "ffn", cfg, cfg == self.parent_ffns[layer])

    def variant(self, layer: int, kind: Kind, name: str) -> Variant:
        for v in self.variants((kind,)):
            if v.layer == layer and v.name == name:
                return v
        raise PuzzleError(f"layer {layer} has no {kind} variant {name!r} in search space {self.name!r}")

    def __len__(self) -> int:
        return sum(len(a) + len(f) for a, f in zip(self.attention, self.ffn))


def resolve_space_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise PuzzleError(f"search space not found: {path}")
        return path
    candidate = SPACES_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = ", ".join(sorted(p.stem for p in SPACES_DIR.glob("*.yaml")))
        raise PuzzleError(f"unknown search space {str(name_or_path)!r}; shipped: {known}")
    return candidate


def _kv_head_counts(spec: Any, parent_kv: int, num_heads: int, where: str) -> list[int]:
    if spec in (None, "all"):
        return [parent_kv]
    if spec == "halves":
        counts, k = [], parent_kv
        while k >= 1:
            if num_heads % k == 0:
                counts.append(k)
            if k == 1:
                break
            k //= 2
        if 1 not in counts:
            counts.append(1)
        return counts
    if isinstance(spec, list) and spec and all(isinstance(k, int) and not isinstance(k, bool) for k in spec):
        for k in spec:
            if k <= 0 or num_heads % k != 0:
                raise PuzzleError(f"{where}: {k} KV heads do not divide the parent's {num_heads} query heads")
        return list(spec)
    raise PuzzleError(f"{where}: kv_heads must be 'halves', 'all' or a list of integers, got {spec!r}")


def _windows(spec: Any, where: str) -> list[int]:
    if spec is None:
        return []
    if isinstance(spec, list) and all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in spec):
        return list(spec)
    raise PuzzleError(f"{where}: windows must be a list of positive integers (tokens), got {spec!r}")


def _flag(section: dict, key: str, where: str) -> bool:
    value = section.get(key, False)
    if not isinstance(value, bool):
        raise PuzzleError(f"{where}: '{key}' must be true or false, got {value!r}")
    return value


def _attention_variants(section: dict, parent: AttentionConfig, num_heads: int, where: str) -> tuple[AttentionConfig, ...]:
    unknown = set(section) - _ATT_KEYS
    if unknown:
        raise PuzzleError(f"{where}: unknown attention keys {sorted(unknown)}; allowed: {sorted(_ATT_KEYS)}")
    if parent.no_op:  # a hybrid's MLP / MoE layer: its attention slot stays empty
        return (parent,)
    if parent.is_mamba:  # a Mamba2 layer is kept at the parent's width or dropped: vLLM builds every Mamba2 layer
        # at the global shape (docs/architecture.md, NemotronHPuzzle export contract)
        return (parent, AttentionConfig(no_op=True)) if _flag(section, "no_op", where) else (parent,)
    parent_kv = parent.num_key_value_heads(num_heads)
    gqa = [parent] + [AttentionConfig(n_heads_in_group=num_heads // k).with_window(parent.window)
                      for k in _kv_head_counts(section.get("kv_heads", "all"), parent_kv, num_heads, where)]
    # windows narrower than the layer's own: a wider one only costs more than the parent's mask
    narrower = [w for w in _windows(section.get("windows"), where) if parent.window is None or w < parent.window]
    out = gqa + [a.with_window(w) for a in gqa for w in narrower]
    if _flag(section, "linear", where):
        out.append(AttentionConfig(replace_with_linear=True))
    if _flag(section, "no_op", where):
        out.append(AttentionConfig(no_op=True))
    return tuple(dict.fromkeys(out))  # dedupe, keep order (parent first)


def _ffn_variants(section: dict, parent: FFNConfig, where: str) -> tuple[FFNConfig, ...]:
    unknown = set(section) - _FFN_KEYS
    if unknown:
        raise PuzzleError(f"{where}: unknown ffn keys {sorted(unknown)}; allowed: {sorted(_FFN_KEYS)}")
    if "ratios" in section and "sizes" in section:
        raise PuzzleError(f"{where}: give either 'ratios' or 'sizes', not both")
    round_to = section.get("round_to", 1)
    if not isinstance(round_to, int) or round_to <= 0:
        raise PuzzleError(f"{where}: round_to must be a positive integer, got {round_to!r}")
    moe = section.get("moe") or {}
    if not isinstance(moe, dict):
        raise PuzzleError(f"{where}: ffn 'moe' must be a mapping, got {type(moe).__name__}")
    if parent.no_op:  # a hybrid's Mamba2 / attention layer: its FFN slot stays empty
        return (parent,)
    if parent.is_moe:
        out = [parent] + _moe_variants(moe, parent, round_to, where)
    else:
        out = [parent] + [FFNConfig(intermediate_size=s) for s in _dense_sizes(section, parent, round_to, where)]
    if _flag(section, "linear", where):
        out.append(FFNConfig(replace_with_linear=True))
    if _flag(section, "no_op", where):
        out.append(FFNConfig(no_op=True))
    return tuple(dict.fromkeys(out))


def _ratios(raw: Any, key: str, where: str) -> list[float]:
    if not isinstance(raw, list) or not raw or not all(
        isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r <= 1 for r in raw
    ):
        raise PuzzleError(f"{where}: {key} must be a list of numbers in (0, 1], got {raw!r}")
    return list(raw)


def _dense_sizes(section: dict, parent: FFNConfig, round_to: int, where: str) -> list[int]:
    if "sizes" in section:
        raw = section["sizes"]
        if not isinstance(raw, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in raw):
            raise PuzzleError(f"{where}: sizes must be a list of positive integers, got {raw!r}")
        return list(raw)
    sizes = []
    for r in _ratios(section.get("ratios", [1.0]), "ratios", where):
        size = max(round_to, int(round(r * parent.intermediate_size / round_to)) * round_to)
        sizes.append(min(size, parent.intermediate_size))
    return sizes


def _moe_variants(section: dict, parent: FFNConfig, round_to: int, where: str) -> list[FFNConfig]:
    """An MoE layer's variants: every (experts kept, top-k, expert width) of the section's lists, top-k at most
    the experts kept; the shared expert as the parent's."""
    unknown = set(section) - _MOE_KEYS
    if unknown:
        raise PuzzleError(f"{where}: unknown ffn.moe keys {sorted(unknown)}; allowed: {sorted(_MOE_KEYS)}")
    own = parent.moe
    counts = [min(own.num_experts, max(1, round(r * own.num_experts)))
              for r in _ratios(section.get("expert_ratios", [1.0]), "expert_ratios", where)]
    widths = [min(own.expert_size, max(round_to, int(round(r * own.expert_size / round_to)) * round_to))
              for r in _ratios(section.get("expert_width_ratios", [1.0]), "expert_width_ratios", where)]
    top_ks = section.get("top_k", [own.top_k])
    if not isinstance(top_ks, list) or not top_ks or not all(
            isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in top_ks):
        raise PuzzleError(f"{where}: ffn.moe top_k must be a list of positive integers, got {top_ks!r}")
    return [FFNConfig(moe=MoEConfig(e, k, w, own.shared_expert_size))
            for e in counts for k in top_ks for w in widths if k <= e]


def _section(raw: dict, key: str, where: str) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise PuzzleError(f"{where}: '{key}' must be a mapping, got {type(value).__name__}")
    return value


def refuse_hybrid(config: Any, stage: str) -> None:
    """One line for a stage that does not handle hybrid models yet (issue 26: NemotronH parents load, convert,
    run, are searched (importance, library, scoring, solve, realize, GKD, evaluate: `puzzle run`), corrected
    (correct-teacher), pruned (prune: pruning/hybrid.py), export as nemotron-h-puzzle and gguf, and are served by
    serve-check). Called before any data or weight is read by every export format but nemotron-h-puzzle and
    gguf."""
    if is_hybrid(config):
        family = getattr(config, "family", None) or getattr(config, "model_type", "?")
        raise PuzzleError(f"{stage}: hybrid Mamba2 parents ({family}) load, convert and run, but {stage} does not "
                          "support them yet (transformer parents only)")


def build_search_space(raw: Any, parent_config: Any, name: str = "custom") -> SearchSpace:
    """Resolve a parsed YAML mapping against a parent config (a supported family's HF config or a PuzzleConfig;
    an MoE parent's layers each start from their own FFN)."""
    if not isinstance(raw, dict):
        raise PuzzleError(f"search space {name!r}: expected a mapping at the top level")
    unknown = set(raw) - {"name", "description", "target_engine", "attention", "ffn", "overrides"}
    if unknown:
        raise PuzzleError(f"search space {name!r}: unknown keys {sorted(unknown)}")
    name = raw.get("name", name)
    n_layers = parent_config.num_hidden_layers
    num_heads = parent_config.num_attention_heads
    try:
        shape = ModelShape.from_config(parent_config)
        parent_att, parent_atts = shape.parent_attention, shape.parent_attentions
        parent_ffns = tuple(b.ffn for b in shape.parent_blocks)
    except BlockConfigError as err:
        raise PuzzleError(f"parent config: {err}") from None
    att_default = _section(raw, "attention", name)
    ffn_default = _section(raw, "ffn", name)
    att_sections = [att_default] * n_layers
    ffn_sections = [ffn_default] * n_layers
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list):
        raise PuzzleError(f"search space {name!r}: 'overrides' must be a list")
    for j, ov in enumerate(overrides):
        where = f"search space {name!r} overrides[{j}]"
        if not isinstance(ov, dict) or "layers" not in ov:
            raise PuzzleError(f"{where}: each override needs 'layers'")
        layers = ov["layers"]
        if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise PuzzleError(f"{where}: 'layers' must be a list of layer indices")
        for i in layers:
            if not -n_layers <= i < n_layers:
                raise PuzzleError(f"{where}: layer {i} is outside the parent's {n_layers} layers")
            if "attention" in ov:
                att_sections[i % n_layers] = _section(ov, "attention", where)
            if "ffn" in ov:
                ffn_sections[i % n_layers] = _section(ov, "ffn", where)
    attention = tuple(_attention_variants(s, parent_atts[i], num_heads, f"search space {name!r}")
                      for i, s in enumerate(att_sections))
    ffn = tuple(_ffn_variants(s, own, f"search space {name!r}") for s, own in zip(ffn_sections, parent_ffns))
    ffn, grouped = _routable(ffn, parent_config)
    engine_name = raw.get("target_engine", DEFAULT_ENGINE)
    if not isinstance(engine_name, str):
        raise PuzzleError(f"search space {name!r}: target_engine must be a name, got {engine_name!r}")
    engine = get_engine(engine_name)
    check_family(engine.name, parent_config)
    attention, ffn, notes = _fit_to_engine(engine, attention, ffn, parent_att, parent_ffns, shape.hidden_size, name)
    notes = notes + grouped
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return SearchSpace(name, n_layers, parent_att, parent_ffns, attention, ffn, engine.name, notes, tuple(parent_atts))


def _routable(ffn: tuple[tuple[FFNConfig, ...], ...], parent_config: Any) -> tuple[tuple, tuple[str, ...]]:
    """The MoE variants a family with grouped routing can route (NemotronH's n_group: the experts split into
    n_group equal groups of two or more, modeling_puzzle.py `MoEFFN`), and a note naming those dropped."""
    family, _ = config_family(parent_config)
    n_group = family.moe.groups(parent_config)[0] if family.moe is not None else 1
    if n_group <= 1:
        return ffn, ()
    ok = lambda f: not f.is_moe or (f.moe.num_experts % n_group == 0 and f.moe.num_experts // n_group >= 2)  # noqa: E731
    dropped = sorted({f.name for variants in ffn for f in variants if not ok(f)})
    kept = tuple(tuple(f for f in variants if ok(f)) for variants in ffn)
    return kept, (f"dropped {', '.join(dropped)}: grouped routing needs the experts in {n_group} groups of two or more",) if dropped else ()


def _fit_to_engine(
    engine: Engine,
    attention: tuple[tuple[AttentionConfig, ...], ...],
    ffn: tuple[tuple[FFNConfig, ...], ...],
    parent_att: AttentionConfig,
    parent_ffns: tuple[FFNConfig, ...],
    hidden_size: int,
    name: str,
) -> tuple[tuple, tuple, tuple[str, ...]]:
    """The space's variants that `engine` can build (puzzle/engines.py): FFN widths snapped to its ffn_mult
    grid, linear variants it lacks dropped, and (llama.cpp) the FFN no-op dropped, since the solver picks a
    layer's attention and FFN independently and every layer may keep a real attention. Likewise an engine
    without variable GQA keeps only the parent's KV heads, and (vLLM, SGLang) the first layer keeps a real
    attention. Notes say what changed."""
    where = f"search space {name!r} (target_engine {engine.name})"
    for parent_ffn in dict.fromkeys(parent_ffns):  # an MoE parent reaches here only for engines serving its family
        if engine.ffn_mult_grid and parent_ffn.is_swiglu and not on_ffn_mult_grid(parent_ffn.intermediate_size, hidden_size):
            raise PuzzleError(f"{where}: the parent's own FFN width {parent_ffn.intermediate_size} is off the engine's "
                              f"ffn_mult grid (multiples of 256), so {engine.name} cannot serve even the parent")
    snapped: dict[int, int] = {}
    dropped: dict[str, str] = {}  # variant name -> rule

    def fit(cfg: AttentionConfig | FFNConfig, first: bool = False, layer: int = 0) -> AttentionConfig | FFNConfig | None:
        broken = sublayer_violations(engine, cfg, hidden_size, first=first, kv_reference=parent_att)
        if broken == ["ffn_mult_grid"]:
            width = min(snap_to_ffn_mult_grid(cfg.intermediate_size), parent_ffns[layer].intermediate_size)
            snapped[cfg.intermediate_size] = width
            return FFNConfig(intermediate_size=width)
        if broken:
            dropped[cfg.name] = broken[0]
            return None
        return cfg

    def keep(configs: Iterable, layer: int) -> tuple:  # dedupe, parent first
        return tuple(dict.fromkeys(c for c in (fit(c, layer == 0, layer) for c in configs) if c is not None))

    attention = tuple(keep(variants, i) for i, variants in enumerate(attention))
    ffn = tuple(keep(variants, i) for i, variants in enumerate(ffn))
    notes = []
    if snapped:
        pairs = ", ".join(f"{a}->{b}" for a, b in sorted(snapped.items()))
        notes.append(f"{where}: FFN widths snapped to the ffn_mult grid (multiples of 256): {pairs}")
    for variant, rule in dropped.items():
        notes.append(f"{where}: dropped {variant} ({RULES[rule]}; {engine.source(rule)})")
    return attention, ffn, tuple(notes)


def load_search_space(name_or_path: str | Path, parent_config: Any) -> SearchSpace:
    """A shipped space by name (`llama_default`, `ffn_only`, `tiny`) or a YAML path, resolved for the parent."""
    path = resolve_space_path(name_or_path)
    return build_search_space(read_yaml(path), parent_config, name=path.stem)


# ---- a run's parent and search space (recorded in R/parent.json by puzzle/run_dir.py) ------------------


def check_parent(parent: str | Path, search_space: str | Path) -> None:
    """A parent a run can use: its config loads (no weights; a GGUF's metadata only) and is of a supported
    architecture, and the search space resolves against its shape. One line otherwise."""
    from puzzle.model.checkpoint import load_config  # torch: only when a parent is recorded

    load_search_space(search_space, load_config(parent))


def resolve_run_info(run_dir: str | Path, parent: str | Path | None = None, search_space: str | None = None) -> dict[str, Any]:
    """{"parent": absolute path, "search_space": name}: given values are checked and recorded, missing ones read back."""
    return RunDir(run_dir).resolve_info(parent, search_space, check=check_parent)


def run_parent(run_dir: str | Path, parent: str | Path | None = None, search_space: str | None = None) -> tuple[Path, str]:
    """(parent path, search space name) of a run; see `resolve_run_info`."""
    info = resolve_run_info(run_dir, parent, search_space)
    return Path(info["parent"]), info["search_space"]
