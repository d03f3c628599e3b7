"""Replace-1-block scoring (Puzzle, arXiv 2411.19146 §3.2): each variant alone in the parent.

For every validation batch the parent runs once; its final normed hidden states and log-probabilities
are the reference. A variant at layer l is put in place of the parent's sublayer (`replace_sublayer`,
undone right after) and only layers l..N-1, the final norm and the LM head run again, starting from
the parent's hidden state entering layer l: the prefix 0..l-1 is the parent's own, so it is not
recomputed. Variants are visited in layer order and the input of the next layer is advanced through the
parent's own layer, so one (B, T, D) input is held at a time, not N+1 of them.

Metrics of a variant, kept as sums per batch (`Sums`) and turned into token-weighted means at the end:
  kl              mean over tokens of KL(parent || child) over the whole vocabulary
  lm_loss         mean next-token cross-entropy of the child (B*(T-1) labelled tokens per batch)
  top1_agreement  share of tokens where the child's argmax is the parent's
  cosine          mean cosine between the child's and the parent's final normed hidden states

KL, LM loss and agreement come from `puzzle.metrics` (`teacher_reference` once per batch, `compare` per
variant: the parent's sum p log p is computed once, each variant costs one batched dot product per
token). The parent's own variant needs no forward at all: its row is the reference's (KL 0, agreement
1, its own LM loss).

Memory per batch: the parent's probabilities, B*T*V*4 bytes (8 x 256 x 49152 x 4 B = 400 MB for
SmolLM2 at `puzzle score`'s default batch of 8), plus two (chunk_tokens, V) float32 temporaries for one
chunk of the child's logits and log-probabilities (2 x 512 x 49152 x 4 B = 200 MB), plus a few (B, T, D).

Shapes: B batch, T sequence, D hidden, V vocabulary, n tokens of one chunk.
"""

import copy
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from puzzle import metrics
from puzzle.errors import PuzzleError
from puzzle.library.store import LibraryReader, key_of, variant_state
from puzzle.model import PuzzleForCausalLM
from puzzle.model.surgery import replace_sublayer
from puzzle.scoring.cost import KEEP_LIBRARY
from puzzle.search_space import Variant

PARENT_KEY = "parent"  # the partial log's key for the parent's own per-batch metrics

StateFn = Callable[[Variant], dict[str, torch.Tensor]]
# The attributes of `PuzzleDecoderLayer` a sublayer swap touches (as in puzzle.model.surgery).
_PARTS = {"attention": ("input_layernorm", "self_attn"), "ffn": ("post_attention_layernorm", "mlp")}
METRICS = ("kl", "lm_loss", "top1_agreement", "cosine")


@dataclass
class Sums(metrics.Sums):
    """`puzzle.metrics.Sums` plus the cosine of the final hidden states; `means()` gives the table's metrics."""

    cosine: float = 0.0  # sum over tokens of cos(child final hidden, parent final hidden)

    def means(self) -> dict[str, float]:
        """The table's columns: `METRICS` (perplexity is left to readers: exp(lm_loss)) and tokens."""
        means = super().means()
        return {k: means[k] for k in METRICS if k in means} | {"cosine": self.cosine / self.tokens, "tokens": self.tokens}


@dataclass
class ParentReference:
    """The parent's outputs on one batch: the targets every variant is compared with."""

    input_ids: torch.Tensor  # (B, T)
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # RoPE cos, sin for positions 0..T-1
    final: torch.Tensor  # (B, T, D) final normed hidden state
    teacher: metrics.TeacherReference  # the parent's distribution over the B*T tokens
    sums: Sums  # the parent scored against itself: KL 0, agreement 1, its own LM loss


def run_layers(model: PuzzleForCausalLM, h: torch.Tensor, layers: range, position_embeddings) -> torch.Tensor:
    """Layers `layers` of the model from hidden state `h` (B, T, D), then the final norm."""
    for j in layers:
        h = model.model.layers[j](h, position_embeddings)
    return model.model.norm(h)


@torch.no_grad()
def parent_reference(model: PuzzleForCausalLM, input_ids: torch.Tensor, chunk_tokens: int = 512) -> ParentReference:
    """Run the all-parent `model` on a batch of token ids (B, T) and keep what scoring compares against."""
    ids = input_ids.to(model.lm_head.weight.device)
    B, T = ids.shape
    h = model.model.embed_tokens(ids)
    position_ids = torch.arange(T, device=ids.device)[None].expand(B, T)
    pos = model.model.rotary_emb(h, position_ids)
    final = run_layers(model, h, range(model.config.num_hidden_layers), pos)
    teacher = metrics.teacher_reference(model.lm_head, final.reshape(B * T, -1), metrics.next_token_labels(ids), chunk_tokens)
    cosine = F.cosine_similarity(final.float(), final.float(), dim=-1).sum().item()
    return ParentReference(input_ids=ids, position_embeddings=pos, final=final, teacher=teacher,
                           sums=Sums(**teacher.sums.to_dict(), cosine=cosine))


@torch.no_grad()
def compare(model: PuzzleForCausalLM, final: torch.Tensor, ref: ParentReference) -> Sums:
    """The metrics' sums of a child whose final normed hidden state on `ref`'s batch is `final` (B, T, D)."""
    sums = metrics.compare(ref.teacher, model.lm_head, final.reshape(-1, final.shape[-1]))
    cosine = F.cosine_similarity(final.float(), ref.final.float(), dim=-1).sum().item()
    return Sums(**sums.to_dict(), cosine=cosine)


@contextmanager
def swapped(model: PuzzleForCausalLM, variant: Variant, state: dict[str, torch.Tensor]) -> Iterator[PuzzleForCausalLM]:
    """`model` with `variant` in place (weights `state`) inside the block; the parent's sublayer after it."""
    block = model.model.layers[variant.layer]
    saved = {name: getattr(block, name) for name in _PARTS[variant.kind]}
    saved_configs = copy.deepcopy(model.config.block_configs)
    replace_sublayer(model, variant.layer, variant.kind, variant.config, state)  # raises before changing anything
    try:
        yield model
    finally:
        for name, module in saved.items():
            setattr(block, name, module)
        model.config.block_configs = saved_configs


def by_layer(variants: Iterable[Variant]) -> dict[int, list[Variant]]:
    """Variants grouped by layer (layers ascending, order kept within a layer)."""
    groups: dict[int, list[Variant]] = defaultdict(list)
    for v in variants:
        groups[v.layer].append(v)
    return dict(sorted(groups.items()))


@torch.no_grad()
def score_batch(
    model: PuzzleForCausalLM,
    ref: ParentReference,
    variants: Iterable[Variant],
    state_fn: StateFn,
    *,
    reuse_prefix: bool = True,
) -> Iterator[tuple[Variant, Sums]]:
    """Score each variant alone in the all-parent `model` on `ref`'s batch; yields (variant, sums) in layer order.

    `state_fn(variant)` gives the variant's weights in `sublayer_state` form; it is called while the model
    holds the parent's blocks. `reuse_prefix=False` runs every variant from the embeddings (the naive
    full forward, for checks and benchmarks); the results are the same.
    """
    groups = by_layer(variants)
    if not groups:
        return
    N = model.config.num_hidden_layers
    bad = [l for l in groups if not 0 <= l < N]
    if bad:
        raise PuzzleError(f"variants name layer {bad[0]} but the parent has {N} layers")
    pos = ref.position_embeddings
    embedded = model.model.embed_tokens(ref.input_ids)
    h = embedded  # (B, T, D): the parent's hidden state entering layer `layer`
    last = max(groups)
    # the prefix only needs to reach the last layer with a variant that is not the parent's own
    last_run = max((l for l, vs in groups.items() if not all(v.is_parent for v in vs)), default=-1)
    for layer in range(last + 1):
        for variant in groups.get(layer, ()):
            if variant.is_parent:  # the parent's own sublayer in its own place is the parent: no forward needed
                yield variant, ref.sums
                continue
            state = state_fn(variant)
            with swapped(model, variant, state):
                if reuse_prefix:
                    final = run_layers(model, h, range(layer, N), pos)
                else:
                    final = run_layers(model, embedded, range(N), pos)
            yield variant, compare(model, final, ref)
        if reuse_prefix and layer < last_run:
            h = model.model.layers[layer](h, pos)


def score_variants(
    model: PuzzleForCausalLM,
    batches: Iterable[torch.Tensor],
    variants: Iterable[Variant],
    state_fn: StateFn,
    *,
    chunk_tokens: int = 512,
    progress: bool = True,
) -> tuple[list[dict], dict[str, float]]:
    """Replace-1-block scores of `variants` over `batches` of token ids (B, T), kept in memory.

    Returns one row per variant (layer, kind, variant, kl, lm_loss, top1_agreement, cosine, tokens) in
    the given order, and the parent's own means. For a resumable run see `puzzle.scoring.commands`.
    """
    variants = list(dict.fromkeys(variants))
    totals: dict[tuple[int, str, str], Sums] = {}
    parent = Sums()
    batches = list(batches)
    bar = tqdm(total=len(variants) * len(batches), desc="score", unit="variant-batch", disable=not progress)
    try:
        for ids in batches:
            ref = parent_reference(model, ids, chunk_tokens)
            parent = parent + ref.sums
            for variant, sums in score_batch(model, ref, variants, state_fn):
                key = (variant.layer, variant.kind, variant.name)
                totals[key] = totals.get(key, Sums()) + sums
                bar.update()
    finally:
        bar.close()
    if parent.tokens == 0:
        raise PuzzleError("no validation batches to score on")
    rows = [{"layer": v.layer, "kind": v.kind, "variant": v.name, **totals[(v.layer, v.kind, v.name)].means()} for v in variants]
    return rows, parent.means()


def score_results(run_dir: Path, model: Any, batches: Iterator[torch.Tensor], todo: dict[int, list[Variant]],
                  parent_batches: set[int], chunk_tokens: int) -> Iterator[tuple[str, int, Sums, Variant | None]]:
    """(key, batch, sums, variant) of the `todo` variants of each batch, and (PARENT_KEY, batch, sums, None)
    of each batch in `parent_batches`; batches with neither are skipped without a forward. Each library
    file is read and verified once per run, not once per batch (kept in memory while the entries take at
    most KEEP_LIBRARY x the parent's bytes; beyond that re-read, not re-hashed; nothing kept when a single
    batch has variants to score: no entry is used twice)."""
    parent_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    reused = sum(1 for variants in todo.values() if variants) > 1
    library = LibraryReader(run_dir, keep_bytes=KEEP_LIBRARY * parent_bytes if reused else 0)

    def state_fn(variant: Variant) -> dict[str, torch.Tensor]:
        if variant.is_parent:
            return variant_state(run_dir, model, variant)
        return library.state(variant)

    for b, ids in enumerate(batches):
        if not todo.get(b) and b not in parent_batches:
            continue
        ref = parent_reference(model, ids, chunk_tokens)
        if b in parent_batches:
            yield PARENT_KEY, b, ref.sums, None
        for variant, sums in score_batch(model, ref, todo.get(b, []), state_fn):
            yield key_of(variant), b, sums, variant
