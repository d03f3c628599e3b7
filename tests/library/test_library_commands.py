"""`puzzle build-library` without Ray: the run's parent is remembered, a rerun is a no-op, mistakes end in
one line, and a build killed midway resumes without retraining what finished or accepting half a file."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from library_testing import save_parent, write_blocks

from puzzle.cli import main
from puzzle.library import store
from puzzle.model.checkpoint import load_config
from puzzle.model.fingerprint import fingerprint
from puzzle.search_space import load_search_space

REPO = Path(__file__).resolve().parents[2]
FAST = ["--search-space", "tiny", "--tokens-per-block", "512", "--batch-size", "4", "--calibration-tokens", "256",
        "--eval-tokens", "128", "--threads", "1"]


def manifest_records(run_dir: Path) -> dict:
    return store.read_manifest(run_dir)["variants"]


def test_cli_builds_a_complete_library_and_a_rerun_only_checks_it(tmp_path, capsys):
    parent = save_parent(tmp_path / "parent", layers=2)
    run = write_blocks(tmp_path / "run")
    assert main(["build-library", "--run-dir", str(run), "--parent", str(parent), *FAST, "--no-ray"]) == 0
    assert json.loads((run / "parent.json").read_text()) == {"parent": str(parent.resolve()), "search_space": "tiny",
                                                             "parent_fingerprint": fingerprint(parent)}
    space = load_search_space("tiny", load_config(parent))
    assert store.missing_variants(run, space.variants()) == []
    manifest = store.read_manifest(run)
    assert manifest["parent"] == str(parent.resolve()) and manifest["settings"]["tokens_per_block"] == 512
    assert "10 variants" in capsys.readouterr().out

    # no --parent, no --search-space: both come from run/parent.json; same settings: nothing is trained again
    same = [a for a in FAST if a != "tiny" and a != "--search-space"]
    assert main(["build-library", "--run-dir", str(run), *same, "--no-ray"]) == 0
    assert "0 trained now, 0 recorded without training, 10 already there" in capsys.readouterr().out
    assert manifest_records(run) == manifest["variants"]


def test_user_mistakes_end_in_one_line(tmp_path, capsys):
    parent = save_parent(tmp_path / "parent", layers=2)
    run = tmp_path / "run"
    assert main(["build-library", "--run-dir", str(run), "--no-ray"]) == 2
    assert "pass --parent" in capsys.readouterr().err
    assert main(["build-library", "--run-dir", str(run), "--parent", str(parent), "--no-ray", *FAST]) == 2
    assert "prepare-data" in capsys.readouterr().err
    write_blocks(run)
    assert main(["build-library", "--run-dir", str(run), "--parent", str(parent), "--layers", "5", "--no-ray", *FAST]) == 2
    assert "outside the parent's 2 layers" in capsys.readouterr().err
    assert main(["build-library", "--run-dir", str(run), "--parent", str(parent), "--tokens-per-block", "0", "--no-ray"]) == 2
    assert "tokens-per-block must be" in capsys.readouterr().err  # the CLI's value check (or the stage's own)

    assert main(["build-library", "--run-dir", str(run), "--parent", str(parent), "--layers", "1", "--no-ray", *FAST]) == 0
    capsys.readouterr()
    other = save_parent(tmp_path / "other", layers=2)
    assert main(["build-library", "--run-dir", str(run), "--parent", str(other), "--layers", "1", "--no-ray", *FAST]) == 2
    assert "use another --run-dir" in capsys.readouterr().err  # a library never mixes two parents
    assert main(["build-library", "--run-dir", str(run), "--layers", "1", "--force", "--no-ray", *FAST]) == 0
    assert "4 trained now, 4 recorded without training, 0 already there" in capsys.readouterr().out  # --force retrains what was there


def _done_layers(run: Path) -> dict[int, int]:
    try:
        records = json.loads((run / "library" / "manifest.json").read_text())["variants"]
    except (OSError, ValueError):
        return {}
    counts: dict[int, int] = {}
    for r in records.values():
        if r["source"] == "trained":
            counts[r["layer"]] = counts.get(r["layer"], 0) + 1
    return counts


def _events(run: Path, event: str) -> list[dict]:
    return [r for r in store.library_log(run).read() if r.get("event") == event]


@pytest.mark.timeout(1800)
@pytest.mark.slow
def test_a_killed_build_resumes_without_retraining_or_accepting_half_files(tmp_path):
    parent = save_parent(tmp_path / "parent", layers=4)
    run = write_blocks(tmp_path / "run")
    # one layer per group, run one after another: layer 1's group finishes well before layer 3's
    cmd = [sys.executable, "-m", "puzzle.cli", "build-library", "--run-dir", str(run), "--parent", str(parent),
           "--search-space", "tiny", "--tokens-per-block", "30000", "--batch-size", "4", "--calibration-tokens", "256",
           "--eval-tokens", "128", "--threads", "1", "--workers", "4", "--no-ray"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # wait for the event (layer 1 finished), however long a busy machine takes; the test's timeout
        # is the ceiling that catches a hang
        while _done_layers(run).get(1, 0) < 4:
            assert proc.poll() is None, "the build ended before it could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # it died of the kill, not of its own accord
    done = _done_layers(run)
    assert done.get(1) == 4 and done.get(3, 0) < 4, done  # killed midway

    finished = {k: r for k, r in manifest_records(run).items() if r["source"] == "trained"}
    mtimes = {k: (run / "library" / r["file"]).stat().st_mtime_ns for k, r in finished.items()}
    good = (run / "library" / finished["L001/ffn/ffn_64"]["file"]).read_bytes()
    # what a crash could leave: half a file where an unfinished variant goes, and a temp file beside it
    planted = store.variant_path(run, 3, "ffn", "ffn_64")
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(good[: len(good) // 2])
    (planted.parent / ".ffn_64.safetensors.x1y2.tmp").write_bytes(good[:100])
    n_done_events = len(_events(run, "variant_done"))

    assert subprocess.run(cmd, cwd=REPO, env=env, capture_output=True).returncode == 0
    records = manifest_records(run)
    space = load_search_space("tiny", load_config(parent))
    assert store.missing_variants(run, space.variants()) == []
    for key, r in finished.items():  # nothing that had finished was trained again
        assert records[key] == r
        assert (run / "library" / r["file"]).stat().st_mtime_ns == mtimes[key]
    retrained = {(e["layer"], e["kind"], e["variant"]) for e in _events(run, "variant_done")[n_done_events:]}
    assert retrained and not any(key == store.variant_key(*k) for k in retrained for key in finished)
    assert (3, "ffn", "ffn_64") in retrained
    assert planted.read_bytes() != good[: len(good) // 2]  # the half file was replaced by a trained one

    # a finished file damaged afterwards is retrained, alone
    damaged = run / "library" / finished["L001/ffn/ffn_64"]["file"]
    damaged.write_bytes(good[:-10])
    n_done_events = len(_events(run, "variant_done"))
    assert subprocess.run(cmd, cwd=REPO, env=env, capture_output=True).returncode == 0
    retrained = [(e["layer"], e["kind"], e["variant"]) for e in _events(run, "variant_done")[n_done_events:]]
    assert retrained == [(1, "ffn", "ffn_64")]
    assert store.missing_variants(run, space.variants()) == []


def test_layers_split_into_contiguous_groups():
    from puzzle.library.cost import split_layers

    groups = split_layers(list(range(30)), 4)
    assert [len(g) for g in groups] == [8, 8, 8, 6] and sum(groups, []) == list(range(30))
    assert split_layers([3, 5], 8) == [[3], [5]]  # never more groups than layers
    assert split_layers([0, 1, 2], 0) == [[0, 1, 2]]


def test_split_with_costs_balances_the_parent_forward_against_training():
    """A later group runs the parent further, so the cost-balanced split gives earlier groups more layers,
    and its largest group costs no more than the equal-size split's (checked by brute force for 2 groups)."""
    from puzzle.library.cost import split_layers

    layers = list(range(30))
    forward, train = [1.0] * 30, {l: 3.0 for l in layers}

    def group_cost(g):
        return sum(forward[: g[-1] + 1]) + sum(train[l] for l in g)

    balanced = split_layers(layers, 2, forward, train)
    assert sum(balanced, []) == layers and len(balanced[0]) > len(balanced[1])
    best = min(max(group_cost(layers[:k]), group_cost(layers[k:])) for k in range(1, 30))
    assert max(map(group_cost, balanced)) == best < max(map(group_cost, split_layers(layers, 2)))
    four = split_layers(layers, 4, forward, train)
    assert sum(four, []) == layers and [len(g) for g in four] == sorted((len(g) for g in four), reverse=True)
    # only the chosen layers are split; the forward still starts at layer 0
    assert sum(split_layers([20, 21, 22, 29], 2, forward, train), []) == [20, 21, 22, 29]
    assert split_layers([3, 5], 8, forward, train) == [[3], [5]]


def _build(run, parent, *extra):
    return main(["build-library", "--run-dir", str(run), "--parent", str(parent), *FAST, *extra])


def test_identical_inputs_give_byte_identical_library_files(tmp_path):
    parent = save_parent(tmp_path / "parent", layers=2)
    runs = [write_blocks(tmp_path / name) for name in ("a", "b")]
    for run in runs:
        assert _build(run, parent, "--no-ray") == 0
    files = [sorted(p.relative_to(run / "library") for p in (run / "library").rglob("*.safetensors")) for run in runs]
    assert files[0] == files[1] and files[0]
    for rel in files[0]:
        assert (runs[0] / "library" / rel).read_bytes() == (runs[1] / "library" / rel).read_bytes(), rel
    hashes = [{k: r.get("sha256") for k, r in manifest_records(run).items()} for run in runs]
    assert hashes[0] == hashes[1]


def test_the_summary_adds_up_and_a_finished_build_starts_no_ray(tmp_path, capsys, monkeypatch):
    import re

    from puzzle.library import ray_jobs

    parent = save_parent(tmp_path / "parent", layers=2)
    run = write_blocks(tmp_path / "run")
    assert _build(run, parent, "--no-ray") == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("block library:")][-1]
    n, *parts = map(int, re.findall(r"(\d+) (?:variants|trained now|recorded|already there)", line))
    records = manifest_records(run)
    untrained = sum(r["source"] != "trained" for r in records.values())
    assert untrained > 0 and sum(parts) == n == len(records), line
    assert f"{untrained} recorded" in line

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started with nothing left to do")

    monkeypatch.setattr(ray_jobs, "run_on_ray", no_ray)
    assert _build(run, parent, "--workers", "2") == 0  # Ray by default
    assert f"0 trained now, 0 recorded without training, {n} already there" in capsys.readouterr().out


def test_stale_temp_files_are_cleaned_when_the_build_starts(tmp_path):
    parent = save_parent(tmp_path / "parent", layers=2)
    run = write_blocks(tmp_path / "run")
    assert _build(run, parent, "--no-ray") == 0
    stale = run / "library" / "L001" / "ffn" / ".ffn_64.safetensors.k3j9x0qa.tmp"
    stale.write_bytes(b"half a file")
    os.utime(stale, (time.time() - 3600,) * 2)
    assert _build(run, parent, "--no-ray") == 0
    assert not stale.exists()
