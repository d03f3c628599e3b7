"""Minitron's shape search: the uniform Llama shape (layers, or hidden and FFN sizes) a parameter target picks.
Counts come from `puzzle.shape.ModelShape` (the parent's block in every layer)."""

import math
from typing import Literal

from puzzle.errors import PuzzleError
from puzzle.model.blocks import FFNConfig, MoEConfig
from puzzle.shape import ModelShape
from puzzle.units import parse_count

Scope = Literal["total", "non-embedding"]


def count(shape: ModelShape, scope: Scope = "total") -> int:
    """A uniform shape's parameters: all of them, or all but the embedding table and the LM head."""
    return shape.total_params() if scope == "total" else shape.non_embedding_params()


def parse_param_count(text: str | int) -> int:
    """"80M" -> 80_000_000, "1.2B" -> 1_200_000_000, "80000000" -> 80_000_000."""
    value = parse_count(text)
    if value < 1:
        raise PuzzleError(f"parameter count must be positive, got {text!r}")
    return int(round(value))


def layers_for_target(parent: ModelShape, target: int, scope: Scope = "total") -> int:
    """How many layers to drop so the count comes closest to `target` (at least one layer stays)."""
    L = parent.num_hidden_layers
    counts = [(abs(count(parent.with_(num_hidden_layers=L - k), scope) - target), k) for k in range(L)]
    return min(counts)[1]


def width_for_target(parent: ModelShape, target: int, scope: Scope = "total", align: int = 64,
                     hidden_align: int = 8, tolerance: float = 0.02) -> ModelShape:
    """Hidden and FFN sizes whose count is within `tolerance` of `target`, shrinking both as evenly as
    possible (attention heads kept, as in Llama-3.1-Minitron's width prune); the closest count when no
    pair is that close. FFN sizes are multiples of `align`; hidden sizes multiples of `hidden_align`
    and of the query heads (transformers' LlamaConfig requires hidden_size % num_heads == 0)."""
    if target >= count(parent, scope):
        raise PuzzleError(f"target {target:,} is not below the parent's {count(parent, scope):,} {scope} parameters")
    step = math.lcm(hidden_align, parent.num_attention_heads)
    hidden = range(step, parent.hidden_size + 1, step)
    ffn = range(align, parent.intermediate_size + 1, align)
    best_close, best_any = None, None
    for h in hidden:
        for f in ffn:
            shape = parent.with_(hidden_size=h, intermediate_size=f)
            miss = abs(count(shape, scope) - target) / target
            balance = abs(math.log(h / parent.hidden_size) - math.log(f / parent.intermediate_size))
            if miss <= tolerance and (best_close is None or balance < best_close[0]):
                best_close = (balance, shape)
            if best_any is None or miss < best_any[0]:
                best_any = (miss, shape)
    if best_any is None:
        raise PuzzleError(f"no hidden size below {parent.hidden_size} is a multiple of {step}; give the sizes explicitly")
    return (best_close or best_any)[1]


def target_sizes(parent: ModelShape, target_params: str | int | None, target_mode: str, params_scope: Scope,
                 hidden_size: int | None, ffn_size: int | None, drop_layers: int) -> tuple[int | None, int | None, int]:
    """(hidden size, FFN size, layers to drop) of a prune: the given ones, or those a parameter target
    picks (`target_mode` depth: layers; width: hidden and FFN sizes, overriding the given ones)."""
    if target_params is None:
        return hidden_size, ffn_size, drop_layers
    target = parse_param_count(target_params)
    if target_mode == "depth":
        return hidden_size, ffn_size, layers_for_target(parent, target, params_scope)
    picked = width_for_target(parent, target, params_scope)
    return picked.hidden_size, picked.intermediate_size, drop_layers


def pruned_moe(moe: MoEConfig, experts: int | None, top_k: int | None) -> MoEConfig:
    """An MoE FFN after uniform expert pruning: `experts` of its experts (None: all), each token routed to
    `top_k` of them (None: the parent's top-k, capped at the experts kept); widths and shared expert kept."""
    n = experts or moe.num_experts
    if not 0 < n <= moe.num_experts:
        raise PuzzleError(f"--experts must be between 1 and the parent's {moe.num_experts} experts, got {n}")
    k = top_k or min(moe.top_k, n)
    if not 0 < k <= n:
        raise PuzzleError(f"--top-k must be between 1 and the {n} experts kept, got {k}")
    return MoEConfig(n, k, moe.expert_size, moe.shared_expert_size)


def pruned_ffns(parent: ModelShape, keep: list[int], experts: int | None = None,
                top_k: int | None = None) -> tuple[str, ...] | None:
    """An MoE parent's FFN names for the kept layers, each MoE one after expert pruning (`pruned_moe`);
    None for a dense parent."""
    if parent.parent_ffns is None:
        return None
    ffns = [FFNConfig.from_name(parent.parent_ffns[i]) for i in keep]
    return tuple((FFNConfig(moe=pruned_moe(f.moe, experts, top_k)) if f.is_moe else f).name for f in ffns)


def pruned_shape(parent: ModelShape, hidden_size: int | None, ffn_size: int | None, heads_per_group: int | None,
                 kv_groups: int | None, keep: list[int], experts: int | None = None,
                 top_k: int | None = None) -> ModelShape:
    """The pruned model's shape: the kept layers (`keep`, their windows and FFNs with them), the given widths
    (None: the parent's), `kv_groups` KV heads of `heads_per_group` query heads each (None: the parent's),
    an MoE parent's `experts` per MoE layer routed `top_k` (`pruned_moe`)."""
    group = parent.num_attention_heads // parent.num_key_value_heads
    kv_groups = kv_groups or parent.num_key_value_heads
    return parent.with_(
        num_hidden_layers=len(keep),
        hidden_size=hidden_size or parent.hidden_size,
        intermediate_size=ffn_size or parent.intermediate_size,
        num_attention_heads=kv_groups * (heads_per_group or group),
        num_key_value_heads=kv_groups,
        sliding_windows=None if parent.sliding_windows is None else tuple(parent.sliding_windows[i] for i in keep),
        parent_ffns=pruned_ffns(parent, keep, experts, top_k),
    )
