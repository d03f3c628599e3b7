"""The shape of a uniformly pruned Llama, its parameter count, and the shape a parameter target picks."""

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

from puzzle.errors import PuzzleError
from puzzle.units import parse_count

Scope = Literal["total", "non-embedding"]


@dataclass(frozen=True)
class LlamaShape:
    """Everything that sets a uniform Llama's parameter count."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool

    @classmethod
    def of(cls, config: Any) -> "LlamaShape":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
            tie_word_embeddings=bool(config.tie_word_embeddings),
        )

    def with_(self, **changes: Any) -> "LlamaShape":
        return replace(self, **changes)

    @property
    def layer_params(self) -> int:
        D, d = self.hidden_size, self.head_dim
        attention = D * self.num_heads * d * 2 + D * self.num_kv_heads * d * 2  # q, o; k, v
        ffn = 3 * D * self.intermediate_size
        return attention + ffn + 2 * D  # + the two RMSNorms

    @property
    def non_embedding_params(self) -> int:
        """Every weight but the embedding table and the LM head (the final norm counts)."""
        return self.num_layers * self.layer_params + self.hidden_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def total_params(self) -> int:
        return self.non_embedding_params + self.embedding_params

    def params(self, scope: Scope = "total") -> int:
        return self.total_params if scope == "total" else self.non_embedding_params


def parse_param_count(text: str | int) -> int:
    """"80M" -> 80_000_000, "1.2B" -> 1_200_000_000, "80000000" -> 80_000_000."""
    value = parse_count(text)
    if value < 1:
        raise PuzzleError(f"parameter count must be positive, got {text!r}")
    return int(round(value))


def layers_for_target(parent: LlamaShape, target: int, scope: Scope = "total") -> int:
    """How many layers to drop so the count comes closest to `target` (at least one layer stays)."""
    counts = [(abs(parent.with_(num_layers=parent.num_layers - k).params(scope) - target), k)
              for k in range(parent.num_layers)]
    return min(counts)[1]


def width_for_target(parent: LlamaShape, target: int, scope: Scope = "total", align: int = 64,
                     hidden_align: int = 8, tolerance: float = 0.02) -> LlamaShape:
    """Hidden and FFN sizes whose count is within `tolerance` of `target`, shrinking both as evenly as
    possible (attention heads kept, as in Llama-3.1-Minitron's width prune); the closest count when no
    pair is that close. FFN sizes are multiples of `align`; hidden sizes multiples of `hidden_align`
    and of the query heads (transformers' LlamaConfig requires hidden_size % num_heads == 0)."""
    if target >= parent.params(scope):
        raise PuzzleError(f"target {target:,} is not below the parent's {parent.params(scope):,} {scope} parameters")
    step = math.lcm(hidden_align, parent.num_heads)
    hidden = range(step, parent.hidden_size + 1, step)
    ffn = range(align, parent.intermediate_size + 1, align)
    best_close, best_any = None, None
    for h in hidden:
        for f in ffn:
            shape = parent.with_(hidden_size=h, intermediate_size=f)
            miss = abs(shape.params(scope) - target) / target
            balance = abs(math.log(h / parent.hidden_size) - math.log(f / parent.intermediate_size))
            if miss <= tolerance and (best_close is None or balance < best_close[0]):
                best_close = (balance, shape)
            if best_any is None or miss < best_any[0]:
                best_any = (miss, shape)
    if best_any is None:
        raise PuzzleError(f"no hidden size below {parent.hidden_size} is a multiple of {step}; give the sizes explicitly")
    return (best_close or best_any)[1]
