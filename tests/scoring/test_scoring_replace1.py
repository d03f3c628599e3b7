"""Replace-1-block scoring on a tiny parent: the parent's own variant scores KL 0, the cached-prefix scorer
equals a naive full forward of the parent with the block swapped, and the model comes back untouched."""

import pytest
import torch
from scoring_testing import make_state_fn, naive_metrics

from puzzle.errors import PuzzleError
from puzzle.model import AttentionConfig, FFNConfig
from puzzle.scoring.replace1 import parent_reference, score_batch, score_variants
from puzzle.search_space import Variant, load_search_space

METRICS = ("kl", "lm_loss", "top1_agreement", "cosine")


@pytest.fixture
def ids():
    return torch.randint(3, 320, (5, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def space(tiny_parent):
    return load_search_space("tiny", tiny_parent.config)


def batches_of(ids, size):
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def test_parent_variant_scores_kl_zero_and_the_parents_loss(tiny_parent, space, ids):
    parents = [v for v in space.variants() if v.is_parent]
    assert len(parents) == 2 * tiny_parent.config.num_hidden_layers
    rows, parent = score_variants(tiny_parent, batches_of(ids, 2), parents, make_state_fn(tiny_parent),
                                  chunk_tokens=7, progress=False)
    assert parent["kl"] == 0.0 and parent["top1_agreement"] == 1.0
    for row in rows:
        assert abs(row["kl"]) <= 1e-6
        assert row["lm_loss"] == pytest.approx(parent["lm_loss"], abs=1e-6)
        assert row["top1_agreement"] == 1.0
        assert row["cosine"] == pytest.approx(1.0, abs=1e-6)
        assert row["tokens"] == ids.numel()


def test_parent_variants_need_no_forward(tiny_parent, space, ids):
    """The parent's own sublayer in its place is the parent: its row is the reference's, with no weights
    loaded and no layers run (independently checked against a full forward in the cached-vs-naive test)."""
    parents = [v for v in space.variants() if v.is_parent]

    def refuse(variant):
        raise AssertionError(f"weights requested for the parent variant {variant}")

    ref = parent_reference(tiny_parent, ids)
    calls = []
    hooks = [layer.register_forward_hook(lambda *a: calls.append(1)) for layer in tiny_parent.model.layers]
    try:
        rows = dict(score_batch(tiny_parent, ref, parents, refuse))
    finally:
        for h in hooks:
            h.remove()
    assert list(rows) == parents and not calls
    assert all(sums == ref.sums for sums in rows.values())


def test_noop_variants_move_the_distribution(tiny_parent, space, ids):
    noops = [v for v in space.variants() if v.config.no_op]
    rows, parent = score_variants(tiny_parent, [ids], noops, make_state_fn(tiny_parent), progress=False)
    assert {(r["layer"], r["kind"]) for r in rows} == {(v.layer, v.kind) for v in noops}
    for row in rows:
        assert row["kl"] > 1e-4
        assert row["cosine"] < 1.0


def test_cached_prefix_equals_naive_full_forward_for_every_variant(tiny_parent, space, ids):
    variants = list(space.variants())
    kinds = {v.name for v in variants}
    assert {"attn_g2", "attn_g4", "attn_linear", "attn_noop", "ffn_128", "ffn_64", "ffn_linear", "ffn_noop"} <= kinds
    state_fn = make_state_fn(tiny_parent)
    ref = parent_reference(tiny_parent, ids, chunk_tokens=7)  # 60 tokens: chunks of 7 do not divide them
    cached = dict(score_batch(tiny_parent, ref, variants, state_fn))
    naive = dict(score_batch(tiny_parent, ref, variants, state_fn, reuse_prefix=False))
    assert list(cached) == variants  # all of them, in layer order
    for v in variants:
        expected = naive_metrics(tiny_parent, ids, v, state_fn(v))
        got = cached[v].means()
        for m in METRICS:
            assert got[m] == pytest.approx(expected[m], abs=1e-5), (v, m)
            assert naive[v].means()[m] == pytest.approx(got[m], abs=1e-5), (v, m)


def test_batches_are_weighted_by_tokens(tiny_parent, space, ids):
    variants = [v for v in space.variants() if v.layer == 2]
    state_fn = make_state_fn(tiny_parent)
    one, parent_one = score_variants(tiny_parent, [ids], variants, state_fn, progress=False)
    ragged, parent_ragged = score_variants(tiny_parent, batches_of(ids, 2), variants, state_fn, progress=False)  # 2, 2, 1
    assert parent_ragged["lm_loss"] == pytest.approx(parent_one["lm_loss"], abs=1e-6)
    for a, b in zip(one, ragged):
        assert a["tokens"] == b["tokens"] == ids.numel()
        for m in METRICS:
            assert a[m] == pytest.approx(b[m], abs=1e-6)


def test_scoring_leaves_the_parent_untouched_even_when_a_variant_fails(tiny_parent, ids):
    before = {k: v.clone() for k, v in tiny_parent.state_dict().items()}
    configs = list(tiny_parent.config.block_configs)
    good = Variant(1, "ffn", FFNConfig(intermediate_size=64), False)
    bad = Variant(2, "attention", AttentionConfig(n_heads_in_group=4), False)
    state_fn = make_state_fn(tiny_parent)
    wrong = {"attention": state_fn(Variant(2, "attention", AttentionConfig(n_heads_in_group=2), True))}  # g2 weights for g4

    def fn(v):
        return wrong[v.kind] if v == bad else state_fn(v)

    ref = parent_reference(tiny_parent, ids)
    with pytest.raises(PuzzleError, match="do not fit"):
        list(score_batch(tiny_parent, ref, [good, bad], fn))
    assert tiny_parent.config.block_configs == configs
    after = tiny_parent.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # and it still computes the parent's logits
    assert parent_reference(tiny_parent, ids).sums.lm == ref.sums.lm


def test_a_variant_outside_the_parent_is_refused(tiny_parent, ids):
    ref = parent_reference(tiny_parent, ids)
    with pytest.raises(PuzzleError, match="layers"):
        list(score_batch(tiny_parent, ref, [Variant(9, "ffn", FFNConfig(no_op=True), False)], make_state_fn(tiny_parent)))
