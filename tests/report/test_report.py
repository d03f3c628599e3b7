"""`puzzle report`: one predicted speedup per model, the one `solve` predicted from the run's costs table."""

import pandas as pd
import pytest

from puzzle.data.prepare import prepare_data
from puzzle.evaluate.commands import evaluate
from puzzle.io import read_json, write_table
from puzzle.profiling.commands import profile
from puzzle.profiling.costs import load_costs
from puzzle.realize.commands import realize
from puzzle.report.commands import report
from puzzle.run_dir import RunDir
from puzzle.solver.commands import solve

from conftest import SAMPLE_TEXT


def _scores_preferring_noops(costs: pd.DataFrame) -> pd.DataFrame:
    """A scores table whose cheapest quality loss is a no-op, so the child needs no library weights."""
    kl = costs["variant"].map(lambda v: 0.01 if v.endswith("_noop") else 1.0).where(~costs["is_parent"], 0.0)
    return costs[["layer", "kind", "variant"]].assign(kl=kl)


def test_report_shows_the_solutions_predicted_speedup_for_its_child(tiny_parent_dir, tmp_path, tiny_cpu_profile):
    run = RunDir(tmp_path / "run")
    budget = str(tiny_cpu_profile)
    profile(run_dir=run.root, budget=budget, parent=tiny_parent_dir, repeats=3)
    costs, meta = load_costs(run.root, budget)
    assert meta["source"] == "measured"
    write_table(_scores_preferring_noops(costs), run.scores_table)
    solve(run_dir=run.root, budget=budget, name="fast")
    child = realize(run_dir=run.root)  # the solution solve wrote
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"doc{i}.txt").write_text(" ".join(SAMPLE_TEXT[i % 5:] + SAMPLE_TEXT[: i % 5]) * 6)
    prepare_data(corpus, tiny_parent_dir, run_dir=run.root, seq_len=32, val_fraction=0.25)
    for name, model in (("parent", tiny_parent_dir), ("fast", child)):
        evaluate(model, run_dir=run.root, val_blocks=1, batch_size=1, budget=budget, measure=False, name=name)

    predicted = read_json(run.solution("fast"))["predicted"]["speedup"]
    assert predicted >= 1.2
    assert read_json(run.eval_result("fast"))["predicted"]["speedup"] == pytest.approx(predicted, rel=1e-9)
    assert read_json(run.eval_result("parent"))["predicted"]["speedup"] == pytest.approx(1.0, rel=1e-9)
    evaluation = report(run.root).read_text().split("## Evaluation against the parent", 1)[1]
    row = next(line for line in evaluation.splitlines() if line.startswith("| fast |"))
    assert row.endswith(f"| {predicted:.2f}x |")


def test_report_plots_each_moe_models_router_load(tmp_path):
    """Evaluations with a router load (evaluate/router.py) get the Router load section and its plot; a run
    without MoE models gets neither."""
    from puzzle.io import atomic_write_json

    run = RunDir(tmp_path / "run")
    atomic_write_json(run.eval_result("parent"), {"name": "parent", "validation": {"perplexity": 3.0}})
    report(tmp_path / "run")
    assert "Router load" not in run.report.read_text() and not run.report_router_load.exists()
    for name, load in (("parent", [0.5, 0.25, 0.25, 0.0]), ("fast", [0.5, 0.5])):
        atomic_write_json(run.eval_result(name), {"name": name, "validation": {"perplexity": 3.0},
                                                  "router_load": {"0": load, "2": load}})
    report(tmp_path / "run")
    assert "## Router load" in run.report.read_text()
    assert run.report_router_load.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
