"""puzzle/cluster.py and the stages on it: a local Ray head started here with two declared GPUs
(`ray start --head --num-gpus 2`), BLD and scoring jobs that request them (the assignment Ray made is read
back from each job's record), libraries and scores equal to the in-process ones, a run directory on an
fsspec filesystem (memory://) giving the same library as a local path, the preflight's one line and its
one-line failures; and the pure parts (requests, GPU shares, fitting, URIs, mirrors) without Ray."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "library"))
sys.path.insert(0, str(Path(__file__).resolve().parent / "scoring"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from library_testing import save_parent, write_blocks  # noqa: E402
from ray_head import local_head  # noqa: E402
from test_scoring_commands import write_data, write_library  # noqa: E402

from puzzle import cluster  # noqa: E402
from puzzle.errors import PuzzleError  # noqa: E402
from puzzle.io import read_table  # noqa: E402
from puzzle.library import store  # noqa: E402
from puzzle.library.commands import build_library  # noqa: E402
from puzzle.model.checkpoint import load_model, to_puzzle  # noqa: E402
from puzzle.run_dir import RunMirror, as_location, is_uri, staged  # noqa: E402
from puzzle.scoring.commands import score  # noqa: E402
from puzzle.search_space import load_search_space  # noqa: E402

SMALL = dict(search_space="tiny", tokens_per_block=256, batch_size=4, calibration_tokens=256, eval_tokens=128, threads=1)
SCORE = dict(search_space="tiny", blocks=5, batch_size=2, chunk_tokens=16)


@pytest.fixture(scope="module")
def head():
    """A Ray head on 127.0.0.1 with 2 CPUs and 2 declared GPUs, joined by this process; stopped at the end."""
    import ray

    with local_head(num_cpus=2, num_gpus=2) as started:
        ray.init(address=started.address, log_to_driver=False, configure_logging=False)
        try:
            yield started.address
        finally:
            ray.shutdown()


def _hashes(manifest: dict) -> dict:
    return {k: (r["source"], r.get("sha256")) for k, r in manifest["variants"].items()}


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory):
    """A library built in this process (no Ray) from the same parent and data: the reference."""
    root = tmp_path_factory.mktemp("undisturbed")
    parent = save_parent(root / "parent", layers=4)
    run = write_blocks(root / "run")
    build_library(run, parent, workers=1, ray=False, **SMALL)
    return parent, run


@pytest.mark.ray
@pytest.mark.timeout(1800)
@pytest.mark.slow
def test_library_jobs_request_gpus_and_build_the_same_library(head, undisturbed, tmp_path, capsys):
    parent, reference = undisturbed
    run = write_blocks(tmp_path / "run")
    summary = build_library(run, parent, workers="auto", **SMALL)  # auto: one worker per GPU of the cluster

    assert "Ray: 1 node(s), 2 CPUs, 2 GPUs" in capsys.readouterr().out
    groups = summary["groups"]
    assert len(groups) == 2 and sorted(sum((g["layers"] for g in groups), [])) == [0, 1, 2, 3]
    for g in groups:
        worker, request = g["worker"], g["request"]
        assert request["num_gpus"] == 1 and request["num_cpus"] == 1 and request["memory"] > 0
        assert len(worker["gpu_ids"]) == 1 and worker["gpu_ids"][0] in ("0", "1")
        assert worker["cuda_visible_devices"] == worker["gpu_ids"][0]  # what Ray gave the task
        assert worker["device"] == "cpu" and worker["pid"] != os.getpid()  # declared GPUs, no CUDA here
    assert _hashes(store.read_manifest(run)) == _hashes(store.read_manifest(reference))
    starts = [r for r in store.library_log(run).read() if r.get("event") == "group_start"]
    assert {r["pid"] for r in starts} == {g["worker"]["pid"] for g in groups}  # workers' logs reach the run's


@pytest.mark.ray
@pytest.mark.timeout(1800)
@pytest.mark.slow
def test_a_run_directory_on_fsspec_memory_gives_the_same_library(head, undisturbed, tmp_path, capsys, monkeypatch):
    import fsspec

    monkeypatch.setenv("PUZZLE_CACHE", str(tmp_path / "cache"))
    parent, reference = undisturbed
    local = write_blocks(tmp_path / "staging")
    fs = fsspec.filesystem("memory")
    fs.put(str(local / "data"), "/fsspec-run/data", recursive=True)
    build_library("memory://fsspec-run", parent, workers=2, **SMALL)

    assert "run dir: memory://fsspec-run (fsspec memory" in capsys.readouterr().out
    manifest = json.loads(fs.cat_file("/fsspec-run/library/manifest.json"))
    assert _hashes(manifest) == _hashes(store.read_manifest(reference))
    for key, record in manifest["variants"].items():
        if record["source"] == "trained":
            assert fs.cat_file(f"/fsspec-run/library/{record['file']}") == (reference / "library" / record["file"]).read_bytes()
    assert not [p for p in fs.find("/fsspec-run") if p.endswith(".uploading")]


@pytest.mark.ray
@pytest.mark.timeout(1800)
@pytest.mark.slow
def test_score_jobs_request_gpus_split_by_layers_and_match_in_process(head, tmp_path, tiny_parent_dir):
    tables = []
    for name, kwargs in (("here", dict(ray=False)), ("ray", dict(workers=2, device="auto"))):
        run = tmp_path / name
        write_data(run)
        model = to_puzzle(load_model(tiny_parent_dir))
        write_library(run, model, load_search_space("tiny", model.config))
        tables.append(read_table(score(run, tiny_parent_dir, **SCORE, **kwargs)))
    pd.testing.assert_frame_equal(tables[0], tables[1], rtol=1e-6)
    workers = [r for r in store.JsonlLog(tmp_path / "ray" / "scores" / "log.jsonl").read() if r["event"] == "score_worker"]
    assert len(workers) == 2
    ranges = [w["layers"] for w in workers]
    assert sorted(sum(ranges, [])) == [0, 1, 2, 3] and all(r == list(range(r[0], r[-1] + 1)) for r in ranges)
    for w in workers:
        assert w["request"]["num_gpus"] == 1 and len(w["worker"]["gpu_ids"]) == 1
        assert w["worker"]["cuda_visible_devices"] == w["worker"]["gpu_ids"][0]


@pytest.mark.ray
@pytest.mark.timeout(1200)
@pytest.mark.slow
def test_preflight_prints_its_mode_and_fails_in_one_line(head, tmp_path, tiny_parent_dir, capsys):
    info = cluster.preflight(tmp_path / "run", tiny_parent_dir)
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"run dir: {(tmp_path / 'run').resolve()} (local path of the driver); Ray: 1 node(s)")
    assert "\n" not in line and info.gpus == 2 and info.cpus == 2
    with pytest.raises(PuzzleError, match=r"a worker on .* cannot read the parent .*missing"):
        cluster.preflight(tmp_path / "run", tmp_path / "missing")  # a path no worker has
    with pytest.raises(PuzzleError, match="cannot open run directory nosuch://x"):
        cluster.preflight("nosuch://x", tiny_parent_dir)
    blocked = tmp_path / "file"
    blocked.write_text("a file, not a directory")
    with pytest.raises(PuzzleError, match="cannot write the run directory"):
        cluster.preflight(blocked / "run", tiny_parent_dir)


# ---- without Ray --------------------------------------------------------------------------------------

GIB = 1024**3


def test_gpu_share_fits_as_many_jobs_as_one_gpu_holds():
    assert cluster.gpu_share(10 * GIB, 80 * GIB) == 0.125  # 8 fit
    assert cluster.gpu_share(30 * GIB, 80 * GIB) == 0.5  # 2 fit
    assert cluster.gpu_share(25 * GIB, 80 * GIB) == 0.3333  # 3 fit, to Ray's 4 decimals
    assert cluster.gpu_share(1 * GIB, 80 * GIB) == 1 / cluster.MAX_GPU_SHARE
    assert cluster.gpu_share(50 * GIB, 80 * GIB) == 1.0
    assert cluster.gpu_share(10 * GIB, None) == 1.0  # memory unknown: a whole GPU


def test_job_resources_and_check_fits():
    gpu_node = cluster.ClusterInfo(({"CPU": 8, "GPU": 2, "memory": 64 * GIB},), gpu_bytes=80 * GIB)
    r = cluster.job_resources(3 * GIB, 20 * GIB, 2, gpu_node)
    assert (r.num_cpus, r.num_gpus, r.memory) == (2, 0.25, 3 * GIB)
    assert cluster.job_resources(3 * GIB, 20 * GIB, 2, gpu_node, use_gpu=False).num_gpus == 0
    cpu_node = cluster.ClusterInfo(({"CPU": 8, "memory": 64 * GIB},))
    assert cluster.job_resources(3 * GIB, 0, 1, cpu_node).num_gpus == 0
    assert cluster.auto_workers(2, gpu_node) == 2 and cluster.auto_workers(2, cpu_node) == 4
    cluster.check_fits([[r, r, r, r]], gpu_node, "library")  # 4 x 2 CPUs, 4 x 0.25 GPU on one node
    with pytest.raises(PuzzleError, match=r"a library job needs 10 CPUs.*largest node has 8 CPUs"):
        cluster.check_fits([[r] * 5], gpu_node, "library")
    with pytest.raises(PuzzleError, match="100.0 GiB of memory"):
        cluster.check_fits([[cluster.Resources(1, 0, 100 * GIB)]], gpu_node, "score")


def test_workers_and_when_ray_is_used(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # the module's head may be joined
    assert cluster.parse_workers("auto") == "auto" and cluster.parse_workers("3") == 3
    with pytest.raises(PuzzleError, match="number or 'auto'"):
        cluster.parse_workers("many")
    assert not cluster.uses_ray("auto", True, None)  # no cluster named: in this process
    assert not cluster.uses_ray(1, True, None) and cluster.uses_ray(2, True, None)
    assert cluster.uses_ray("auto", True, "ray://head:10001") and not cluster.uses_ray(2, False, None)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert cluster.uses_ray("auto", True, None) and not cluster.uses_ray(0, True, None)


def test_uris_survive_the_cli_path_type():
    assert as_location(Path("memory://x")) == "memory://x" and as_location(Path("s3://b/k")) == "s3://b/k"
    assert as_location(Path("file:///tmp/r")) == "file:///tmp/r" and as_location("runs/r") == Path("runs/r")
    assert is_uri("gs://b/r") and not is_uri("/tmp/r") and not is_uri("C:/r")


def test_a_mirror_pushes_what_changed_and_pulls_what_changed_remotely(tmp_path, monkeypatch):
    import fsspec

    monkeypatch.setenv("PUZZLE_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/mirror-run/data/meta.json", b'{"seq_len": 4}')
    with staged("memory://mirror-run") as local:
        assert (local / "data" / "meta.json").read_bytes() == b'{"seq_len": 4}'
        (local / "library").mkdir()
        (local / "library" / "a.bin").write_bytes(b"a")
        time.sleep(0.01)
        (local / "library" / "manifest.json").write_text("{}")
    assert fs.cat_file("/mirror-run/library/a.bin") == b"a" and fs.cat_file("/mirror-run/library/manifest.json") == b"{}"
    assert not [p for p in fs.find("/mirror-run") if ".locks" in p or "sync" in p]
    mirror = RunMirror("memory://mirror-run")
    assert mirror.push() == 0  # nothing changed since
    fs.pipe_file("/mirror-run/data/meta.json", b'{"seq_len": 8}')
    fs.rm_file("/mirror-run/library/a.bin")
    assert mirror.pull() == 1
    assert (mirror.local / "data" / "meta.json").read_bytes() == b'{"seq_len": 8}'
    assert not (mirror.local / "library" / "a.bin").exists()  # deleted remotely since it was synced


def test_submit_ray_job_submits_puzzle_run(tmp_path):
    fake = tmp_path / "ray"
    fake.write_text("#!/bin/sh\necho \"$@\" > \"$ARGS_OUT\"\n")
    fake.chmod(0o755)
    script = Path(__file__).resolve().parents[1] / "scripts" / "submit_ray_job.sh"
    env = {**os.environ, "RAY": str(fake), "ARGS_OUT": str(tmp_path / "args"), "RAY_ADDRESS": "http://head:8265"}
    done = subprocess.run([str(script), "configs/smollm2_quick.yaml", "s3://bucket/runs/quick", "--force"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "args").read_text().split()
    assert args[:6] == ["job", "submit", "--address", "http://head:8265", "--working-dir", "."]
    assert args[args.index("--") + 1:] == ["puzzle", "run", "configs/smollm2_quick.yaml", "--run-dir",
                                           "s3://bucket/runs/quick", "--force"]
    assert subprocess.run([str(script)], env=env, capture_output=True).returncode == 2


@pytest.mark.ray
@pytest.mark.timeout(1800)
@pytest.mark.slow
def test_puzzle_run_with_ray_address_puts_library_and_score_on_the_cluster_and_a_uri_run_dir(
        head, tmp_path, tiny_parent_dir, capsys, monkeypatch):
    import fsspec
    import yaml
    from test_pipeline import tiny_config

    from puzzle.cli import main

    monkeypatch.setenv("RAY_ADDRESS", head)
    monkeypatch.setenv("PUZZLE_CACHE", str(tmp_path / "cache"))
    raw = tiny_config(tmp_path, tiny_parent_dir)
    raw["build_library"].pop("ray")  # workers: auto, RAY_ADDRESS set: one Ray task per GPU
    raw["run_dir"] = "memory://piped-run"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["run", str(config), "--check"]) == 0
    out = capsys.readouterr().out
    assert "run dir: memory://piped-run (fsspec memory" in out and "Ray: 1 node(s), 2 CPUs, 2 GPUs" in out
    assert main(["run", str(config)]) == 0, capsys.readouterr().err

    fs = fsspec.filesystem("memory")
    assert fs.exists("/piped-run/report.md") and fs.exists("/piped-run/scores/scores.parquet")
    log = [json.loads(line) for line in fs.cat_file("/piped-run/library/log.jsonl").splitlines() if line.strip()]
    starts = [r for r in log if r.get("event") == "group_start"]
    # two tasks, both in Ray workers; not two distinct worker processes: on a busy machine Ray may run the
    # second task in the first one's worker, which finished before another worker had started
    assert len(starts) == 2 and os.getpid() not in {r["pid"] for r in starts}
    scored = [json.loads(line) for line in fs.cat_file("/piped-run/scores/log.jsonl").splitlines() if line.strip()]
    assert len([r for r in scored if r["event"] == "score_worker"]) == 2
    ledger = json.loads(fs.cat_file("/piped-run/pipeline.json"))
    assert "build_library" in ledger and "report" in ledger
    capsys.readouterr()
    assert main(["run", str(config)]) == 0  # from a fresh mirror too: the ledger is the URI's, not a path's
    shutil.rmtree(tmp_path / "cache")
    capsys.readouterr()
    assert main(["run", str(config)]) == 0
    assert capsys.readouterr().out.count("complete, skipped") == len(ledger)


@pytest.mark.ray
@pytest.mark.timeout(1200)
@pytest.mark.slow
def test_jobs_of_one_layer_group_share_a_strict_pack_placement_group(head):
    import ray

    requests = [cluster.Resources(num_cpus=1, num_gpus=0.5, memory=2**20)] * 3
    options, groups = cluster.placement([(0, 1), (0, 1), (2, 3)], requests)
    try:
        assert len(groups) == 1 and options[2] == {}  # a group of one job is one task: nothing to gang
        strategies = [options[i]["scheduling_strategy"] for i in (0, 1)]
        assert strategies[0].placement_group == strategies[1].placement_group == groups[0]
        assert [s.placement_group_bundle_index for s in strategies] == [0, 1]
        assert ray.get(groups[0].ready(), timeout=600) and groups[0].bundle_specs[0] == {
            "CPU": 1, "GPU": 0.5, "memory": 2**20}

        def where() -> tuple[str, list[str]]:
            return ray.get_runtime_context().get_node_id(), [str(i) for i in ray.get_gpu_ids()]

        task = ray.remote(where)
        placed = ray.get([task.options(**requests[i].options(), **options[i]).remote() for i in (0, 1)], timeout=600)
        assert placed[0][0] == placed[1][0] and all(len(gpus) == 1 for _, gpus in placed)
    finally:
        cluster.remove_placement(groups)
