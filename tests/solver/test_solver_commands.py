"""`puzzle solve` end to end on a synthetic run directory."""

import itertools
import json

import pytest

from puzzle.cli import main
from puzzle.io import atomic_write_json, write_table
from puzzle.model.blocks import BlockConfig
from puzzle.run_dir import RunDir
from puzzle.solver.commands import merge_constraints
from puzzle.units import parse_count
from puzzle.solver.problem import Workload
from puzzle.solver.synthetic import synthetic_tables

BUDGET = "toy_gpu"


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no hardware_profiles/ here unless a test writes one
    scores, costs, meta = synthetic_tables(
        num_layers=6, attention_variants=4, ffn_variants=5, seed=1, workload=Workload(8, 256, 64)
    )
    run = tmp_path / "run"
    write_table(scores, run / "scores" / "scores")
    write_table(costs, run / "costs" / BUDGET)
    meta["profile"] = BUDGET
    meta["constraints"] = {"speedup": 1.5}
    atomic_write_json(run / "costs" / f"{BUDGET}.json", meta)
    return run


def solve_cli(run_dir, *args):
    return main(["solve", "--run-dir", str(run_dir), "--budget", BUDGET, *args])


def read_solution(run_dir, name=BUDGET):
    return json.loads((run_dir / "solutions" / f"{name}.json").read_text())


def test_solve_uses_the_profile_default_and_writes_a_valid_solution(run_dir, capsys):
    assert solve_cli(run_dir) == 0
    sol = read_solution(run_dir)
    assert sol["constraints"]["speedup"] == 1.5
    assert sol["predicted"]["speedup"] >= 1.5
    assert sol["predicted"]["throughput"] >= sol["constraints"]["throughput_floor"]
    assert len(sol["block_configs"]) == len(sol["choices"]) == 6
    for raw, choice in zip(sol["block_configs"], sol["choices"]):
        block = BlockConfig.from_dict(raw, hidden_size=1024)
        assert (block.attention.name, block.ffn.name) == (choice["attention"], choice["ffn"])
    assert sol["status"] == "optimal" and sol["gap"] == 0.0 and sol["objective"] > 0
    out = capsys.readouterr().out
    assert "layer" in out and "optimal" in out and "speedup" in out


def test_flags_override_the_profile_and_backends_agree(run_dir):
    objectives = []
    for backend in ("pulp", "ortools"):
        assert solve_cli(run_dir, "--speedup", "2.0", "--max-params", "120M", "--backend", backend) == 0
        sol = read_solution(run_dir)
        assert sol["constraints"]["speedup"] == 2.0 and sol["constraints"]["max_params"] == 120e6
        assert sol["predicted"]["speedup"] >= 2.0 and sol["predicted"]["params"] <= 120e6
        objectives.append(sol["objective"])
    assert objectives[0] == pytest.approx(objectives[1], rel=1e-9)


def test_infeasible_budget_exits_2_with_one_line(run_dir, capsys):
    assert solve_cli(run_dir, "--speedup", "40") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("puzzle: error: infeasible: throughput >= ")
    assert "best any choice reaches is" in err and "speedup" in err
    assert not (run_dir / "solutions" / f"{BUDGET}.json").exists()


def test_profile_yaml_supplies_constraints_when_the_json_has_none(run_dir, tmp_path):
    meta = json.loads((run_dir / "costs" / f"{BUDGET}.json").read_text())
    del meta["constraints"]
    atomic_write_json(run_dir / "costs" / f"{BUDGET}.json", meta)
    (tmp_path / "hardware_profiles").mkdir()
    (tmp_path / "hardware_profiles" / f"{BUDGET}.yaml").write_text("constraints:\n  speedup: 1.8\n  memory_gib: 0.5\n")
    assert solve_cli(run_dir, "--name", "from_yaml") == 0
    sol = read_solution(run_dir, "from_yaml")
    assert sol["constraints"]["speedup"] == 1.8 and sol["constraints"]["memory_gib"] == 0.5
    assert sol["predicted"]["memory_gib"] <= 0.5


def test_num_solutions_are_diverse(run_dir):
    assert solve_cli(run_dir, "--num-solutions", "3", "--diversity", "0.5", "--name", "div") == 0
    sols = [read_solution(run_dir, n) for n in ("div", "div-2", "div-3")]
    picks = [[(c["attention"], c["ffn"]) for c in s["choices"]] for s in sols]
    for a, b in itertools.combinations(picks, 2):
        assert sum(x != y for x, y in zip(a, b)) >= 3
    assert [s["rank"] for s in sols] == [1, 2, 3]
    assert sols[0]["objective"] <= sols[1]["objective"] <= sols[2]["objective"]
    # realize without --solution takes the best of what the last solve wrote
    assert RunDir(run_dir).find_solution() == run_dir / "solutions" / "div.json"
    assert solve_cli(run_dir, "--name", "other") == 0
    assert RunDir(run_dir).find_solution() == run_dir / "solutions" / "other.json"


def test_batch_sizes_keep_the_best(run_dir):
    assert solve_cli(run_dir, "--speedup", "2.0", "--batch-sizes", "4", "8", "16", "--name", "b") == 0
    swept = read_solution(run_dir, "b")
    assert solve_cli(run_dir, "--speedup", "2.0", "--name", "single") == 0
    single = read_solution(run_dir, "single")
    assert swept["predicted"]["batch_size"] in (4, 8, 16)
    assert swept["objective"] <= single["objective"] + 1e-12


def test_sweep_writes_a_pareto_frontier(run_dir):
    assert solve_cli(run_dir, "--sweep", "1.2:2.4:0.4") == 0
    pareto = json.loads((run_dir / "solutions" / "pareto.json").read_text())
    assert [p["target_speedup"] for p in pareto["points"]] == [1.2, 1.6, 2.0, 2.4]
    feasible = [p for p in pareto["points"] if p["feasible"]]
    assert feasible and all(p["speedup"] >= p["target_speedup"] for p in feasible)
    assert (run_dir / "solutions" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert solve_cli(run_dir, "--sweep", "1.2:2.0:0.4", "--speedup", "2") == 2


def test_missing_costs_and_bad_values_are_user_errors(run_dir, capsys):
    assert main(["solve", "--run-dir", str(run_dir), "--budget", "nope"]) == 2
    assert "puzzle profile --budget nope" in capsys.readouterr().err
    assert solve_cli(run_dir, "--max-params", "lots") == 2
    assert solve_cli(run_dir, "--metric", "bleu") == 2
    assert solve_cli(run_dir, "--sweep", "3:1:0.5") == 2


def test_parse_count_and_merge():
    assert parse_count("80M") == 80e6 and parse_count("1.5B") == 1.5e9 and parse_count("80e6") == 80e6
    assert parse_count(5) == 5
    merged = merge_constraints({"speedup": 2.0, "memory_gib": 40}, throughput=1000.0)
    assert merged.speedup is None and merged.throughput == 1000.0 and merged.memory_gib == 40


def test_fixed_costs_may_be_given_per_component(run_dir):
    assert solve_cli(run_dir, "--speedup", "1.7", "--name", "flat") == 0
    meta = json.loads((run_dir / "costs" / f"{BUDGET}.json").read_text())
    fixed = meta.pop("fixed")
    half = {k: v / 2 for k, v in fixed.items()}
    meta["fixed_costs"] = {"embeddings": half, "lm_head": half, "final_norm": {"params": 0}}
    atomic_write_json(run_dir / "costs" / f"{BUDGET}.json", meta)
    assert solve_cli(run_dir, "--speedup", "1.7", "--name", "parts") == 0
    flat, parts = read_solution(run_dir, "flat"), read_solution(run_dir, "parts")
    assert parts["choices"] == flat["choices"]
    assert parts["predicted"]["params"] == flat["predicted"]["params"]


@pytest.mark.parametrize("engine, speedup", [("vllm", "1.8"), ("sglang", "1.5"), ("llamacpp", "1.15")])
def test_target_engine_keeps_only_variants_it_builds(run_dir, engine, speedup):
    from puzzle.engines import ENGINES, violations

    def broken(solution):  # the whole child's: first-layer and variable-GQA rules included
        return violations(ENGINES[engine], [BlockConfig.from_dict(raw, hidden_size=1024)
                                            for raw in solution["block_configs"]], 1024)

    # the synthetic tables offer linear and no-op sublayers, several KV-head counts and FFN widths off the
    # ffn_mult grid (2752, 1344)
    assert solve_cli(run_dir, "--speedup", speedup, "--target-engine", engine) == 0
    sol = read_solution(run_dir)
    assert sol["target_engine"] == engine
    assert broken(sol) == []
    assert solve_cli(run_dir, "--speedup", speedup) == 0  # without a target, the same tables pick what they may
    assert broken(read_solution(run_dir))


def _toy_profile(path, calibration_error=None):
    """A YAML profile filed as BUDGET (its `name`), so `--budget PATH` finds the run's costs."""
    extra = "" if calibration_error is None else f"  calibration_error: {calibration_error}\n"
    path.write_text(f"name: {BUDGET}\ndevice:\n  name: toy\n  peak_flops: {{bf16: 1.0e+12}}\n"
                    f"  memory_bandwidth: 1.0e+11\n  memory_bytes: 8.0e+9\n{extra}"
                    "workload: {batch_size: 8, input_len: 256, output_len: 64, dtype: bf16}\n")
    return path


def test_margin_aims_above_every_speed_constraint_and_records_what_was_asked(run_dir, capsys):
    assert solve_cli(run_dir, "--speedup", "1.5", "--latency-ms", "1e6", "--margin", "0.1", "--name", "m") == 0
    sol = read_solution(run_dir, "m")
    assert sol["margin"] == 0.1
    assert sol["requested_constraints"] == {"speedup": 1.5, "latency_ms": 1e6}
    assert sol["constraints"]["speedup"] == pytest.approx(1.65)
    assert sol["constraints"]["latency_ms"] == pytest.approx(1e6 / 1.1)
    assert sol["predicted"]["speedup"] >= 1.65
    assert "aiming 10.0% above the speed constraints" in capsys.readouterr().out
    # a throughput floor is scaled the same way; margin 0 (the default) leaves the budget as given
    assert solve_cli(run_dir, "--throughput", "100", "--margin", "0.2", "--name", "t") == 0
    assert read_solution(run_dir, "t")["constraints"]["throughput"] == pytest.approx(120)
    assert solve_cli(run_dir, "--speedup", "1.5", "--name", "plain") == 0
    plain = read_solution(run_dir, "plain")
    assert plain["constraints"]["speedup"] == 1.5 and "margin" not in plain and "requested_constraints" not in plain


def test_margin_calibrated_reads_the_profile_calibration_error(run_dir, tmp_path):
    profile = _toy_profile(tmp_path / "toy.yaml", calibration_error=0.08)
    assert main(["solve", "--run-dir", str(run_dir), "--budget", str(profile), "--speedup", "1.5",
                 "--margin", "calibrated", "--name", "cal"]) == 0
    sol = read_solution(run_dir, "cal")
    assert sol["margin"] == 0.08 and sol["constraints"]["speedup"] == pytest.approx(1.62)


@pytest.mark.parametrize("margin, message", [
    ("calibrated", "records no calibration_error"), ("-0.1", "must be a fraction in [0, 1)"),
    ("1.5", "must be a fraction in [0, 1)"), ("nan", "must be a fraction in [0, 1)"), ("lots", "must be a fraction"),
])
def test_a_bad_margin_is_one_line_before_any_work(run_dir, tmp_path, capsys, margin, message):
    profile = _toy_profile(tmp_path / "toy.yaml")  # no calibration_error
    assert main(["solve", "--run-dir", str(run_dir), "--budget", str(profile), "--margin", margin]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (run_dir / "solutions").exists()


def test_margin_and_sweep_are_refused_together(run_dir, capsys):
    assert solve_cli(run_dir, "--sweep", "1.2:2:0.4", "--margin", "0.1") == 2
    assert "--margin" in capsys.readouterr().err
