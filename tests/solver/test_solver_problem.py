"""Building the problem from the scores and costs tables; the cost model's arithmetic."""

import math

import pandas as pd
import pytest

from puzzle.errors import PuzzleError
from puzzle.model.blocks import BlockConfig
from puzzle.solver.problem import GIB, Constraints, FixedCosts, Workload, problem_from_tables
from puzzle.solver.synthetic import synthetic_tables

WORKLOAD = Workload(batch_size=8, input_len=128, output_len=32)


@pytest.fixture
def tables():
    scores, costs, meta = synthetic_tables(num_layers=3, attention_variants=4, ffn_variants=5, workload=WORKLOAD)
    return scores, costs, FixedCosts(**meta["fixed"])


def test_problem_matches_the_tables(tables):
    scores, costs, fixed = tables
    problem = problem_from_tables(scores, costs, WORKLOAD, fixed)
    assert problem.num_layers == 3
    assert [len(l.attention) for l in problem.layers] == [4, 4, 4]
    assert [len(l.ffn) for l in problem.layers] == [5, 5, 5]
    # The parent (is_parent) comes first in each list and has quality 0.
    assert all(l.attention[0].is_parent and l.ffn[0].is_parent for l in problem.layers)
    parent = problem.evaluate(problem.parent_selection())
    rows = costs[costs["is_parent"]]
    assert parent.quality == 0.0
    assert parent.params == fixed.params + rows["params"].sum()
    assert parent.memory_bytes == fixed.param_bytes + rows["param_bytes"].sum() + rows["kv_cache_bytes"].sum()
    time_s = fixed.prefill_s + rows["prefill_s"].sum() + WORKLOAD.output_len * (fixed.decode_s + rows["decode_s"].sum())
    assert parent.time_s == pytest.approx(time_s, rel=1e-12)
    assert parent.throughput == pytest.approx(WORKLOAD.batch_size * WORKLOAD.output_len / time_s)
    assert parent.latency_ms == pytest.approx(time_s * 1e3)
    assert problem.reference_throughput == parent.throughput and parent.speedup == 1.0
    # Quality of a chosen variant is its kl.
    noop = next(i for i, o in enumerate(problem.layers[1].ffn) if o.name == "ffn_noop")
    kl = scores.query("layer == 1 and variant == 'ffn_noop'")["kl"].item()
    selection = list(problem.parent_selection())
    selection[1] = (0, noop)
    assert problem.evaluate(tuple(selection)).quality == pytest.approx(kl)


def test_limits_are_the_constraints_in_linear_form(tables):
    scores, costs, fixed = tables
    problem = problem_from_tables(scores, costs, WORKLOAD, fixed)
    limits = {l.name: l for l in problem.limits(Constraints(speedup=2.0, memory_gib=1.5, latency_ms=10, max_params=1e6))}
    assert limits["throughput"].bound == pytest.approx(
        WORKLOAD.batch_size * WORKLOAD.output_len / (2.0 * problem.reference_throughput)
    )
    assert limits["memory"].bound == 1.5 * GIB and limits["latency"].bound == 0.01 and limits["params"].bound == 1e6
    both = problem.throughput_floor(Constraints(speedup=2.0, throughput=1.0))
    assert both == 2.0 * problem.reference_throughput  # the stricter floor wins


def test_higher_is_better_metrics_count_their_drop(tables):
    scores, costs, fixed = tables
    problem = problem_from_tables(scores, costs, WORKLOAD, fixed, metric="top1_agreement")
    for layer in problem.layers:
        for option in layer.attention + layer.ffn:
            assert option.quality >= 0.0
            assert option.quality == pytest.approx(1.0 - option.score)  # the parent agrees fully


def test_parent_found_from_kl_without_is_parent(tables):
    scores, costs, fixed = tables
    problem = problem_from_tables(scores, costs.drop(columns="is_parent"), WORKLOAD, fixed, metric="lm_loss")
    assert problem.parent_selection() == ((0, 0),) * 3
    assert all(l.attention[0].name == "attn_g4" for l in problem.layers)


def test_mismatched_tables_are_user_errors(tables):
    scores, costs, fixed = tables
    with pytest.raises(PuzzleError, match="layer 2 ffn ffn_noop has a score but no cost"):
        problem_from_tables(scores, costs[~((costs.layer == 2) & (costs.variant == "ffn_noop"))], WORKLOAD, fixed)
    with pytest.raises(PuzzleError, match="unknown metric 'bleu'"):
        problem_from_tables(scores, costs, WORKLOAD, fixed, metric="bleu")
    with pytest.raises(PuzzleError, match="lacks column"):
        problem_from_tables(scores, costs.drop(columns="decode_s"), WORKLOAD, fixed)
    two_parents = costs.copy()
    two_parents.loc[(two_parents.layer == 0) & (two_parents.variant == "attn_noop"), "is_parent"] = True
    with pytest.raises(PuzzleError, match="layer 0 attention: expected one parent"):
        problem_from_tables(scores, two_parents, WORKLOAD, fixed)
    nan = scores.copy()
    nan.loc[3, "kl"] = math.nan
    with pytest.raises(PuzzleError, match="missing"):
        problem_from_tables(nan, costs, WORKLOAD, fixed)


def test_batch_rescaling(tables):
    scores, costs, fixed = tables
    problem = problem_from_tables(scores, costs, WORKLOAD, fixed)
    double = problem_from_tables(scores, costs, WORKLOAD, fixed, batch_size=16)
    a, b = problem.layers[0].attention[0], double.layers[0].attention[0]
    assert b.kv_cache_bytes == 2 * a.kv_cache_bytes and b.prefill_s == pytest.approx(2 * a.prefill_s)
    assert b.decode_s == a.decode_s and b.param_bytes == a.param_bytes
    assert double.reference_throughput == problem.reference_throughput
    assert double.evaluate(double.parent_selection()).speedup > 1.0  # a bigger batch alone goes faster


def test_costs_rows_for_several_batch_sizes_are_used_as_given(tables):
    scores, costs, fixed = tables
    other = costs.assign(batch_size=32, decode_s=costs["decode_s"] * 3)
    both = pd.concat([costs.assign(batch_size=WORKLOAD.batch_size), other])
    base = problem_from_tables(scores, both, WORKLOAD, fixed)
    at32 = problem_from_tables(scores, both, WORKLOAD, fixed, batch_size=32)
    assert at32.batch_size == 32
    assert at32.layers[1].ffn[0].decode_s == pytest.approx(3 * base.layers[1].ffn[0].decode_s)
    assert at32.reference_throughput == base.reference_throughput
    at16 = problem_from_tables(scores, both, WORKLOAD, fixed, batch_size=16)  # no rows: re-scaled
    assert at16.layers[1].ffn[0].decode_s == base.layers[1].ffn[0].decode_s


def test_block_configs_are_valid_nemotron_nas_entries(tables):
    scores, costs, fixed = tables
    problem = problem_from_tables(scores, costs, WORKLOAD, fixed, hidden_size=1024)
    everything = tuple((len(l.attention) - 1 - i % 2, len(l.ffn) - 1 - i) for i, l in enumerate(problem.layers))
    configs = problem.block_configs(everything)
    names = [(c["layer"], c["attention"], c["ffn"]) for c in problem.choices(everything)]
    for (layer, attention, ffn), raw in zip(names, configs):
        block = BlockConfig.from_dict(raw, hidden_size=1024)
        assert block.attention.name == attention and block.ffn.name == ffn
    swiglu = problem.block_configs(problem.parent_selection())[0]
    assert BlockConfig.from_dict(swiglu, hidden_size=1024).to_dict(1024) == swiglu


@pytest.mark.parametrize("kind, bad", [("attention", "attn_gqa4"), ("ffn", "attn_g4"), ("ffn", "ffn_0")])
def test_a_variant_name_that_is_no_block_is_refused_before_solving(tables, kind, bad):
    scores, costs, fixed = tables
    row = (costs["layer"] == 1) & (costs["kind"] == kind) & ~costs["is_parent"]
    old = costs[row]["variant"].iloc[0]
    rename = lambda df: df.assign(variant=df["variant"].where(~((df["layer"] == 1) & (df["variant"] == old)), bad))  # noqa: E731
    with pytest.raises(PuzzleError, match=f"layer 1: unknown {kind} variant '{bad}'"):
        problem_from_tables(rename(scores), rename(costs), WORKLOAD, fixed)


def test_blocks_of_a_choice_are_typed_and_match_the_choices(tables):
    scores, costs, fixed = tables
    problem = problem_from_tables(scores, costs, WORKLOAD, fixed, hidden_size=1024)
    selection = problem.parent_selection()
    blocks = problem.blocks(selection)
    assert [f"{c['attention']}+{c['ffn']}" for c in problem.choices(selection)] == [b.name for b in blocks]
    assert problem.block_configs(selection) == [b.to_dict(1024) for b in blocks]
