"""The library build on Ray: layer groups as tasks, a worker killed mid-task is resubmitted without redoing the
other group's work (or its own finished variants) and the library equals an undisturbed build's, and
`ray job submit -- puzzle build-library` works against a real local head."""

import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from library_testing import save_parent, write_blocks
from ray_head import RAY_BIN, local_head

from puzzle.library import store
from puzzle.library.commands import build_library
from puzzle.model.checkpoint import load_config
from puzzle.search_space import load_search_space

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SMALL = dict(search_space="tiny", batch_size=4, calibration_tokens=256, eval_tokens=128, threads=1)


def _events(run: Path, event: str) -> list[dict]:
    return [r for r in store.library_log(run).read() if r.get("event") == event]


@pytest.fixture
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
             log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.timeout(1800)
def test_layer_groups_run_as_ray_tasks_and_a_killed_worker_is_retried(tmp_path, local_ray):
    parent = save_parent(tmp_path / "parent", layers=4)
    run = write_blocks(tmp_path / "run")
    killed: list[int] = []
    build_over = threading.Event()

    def kill_second_group_once() -> None:
        # Waits for the event itself (the group's start reaching the driver's log), however long a busy
        # machine takes to get there; it stops looking only once the build is over (then `killed` stays empty
        # and the test says so). The test's timeout is the ceiling that catches a hang.
        while not build_over.is_set():
            for e in _events(run, "group_start"):
                if e["layers"][-1] == 3:  # the group that ends at the last layer
                    os.kill(e["pid"], signal.SIGKILL)  # the Ray worker process running that task
                    killed.append(e["pid"])
                    return
            build_over.wait(0.02)

    killer = threading.Thread(target=kill_second_group_once)
    killer.start()
    try:
        summary = build_library(run, parent, tokens_per_block=20000, workers=2, max_retries=2, **SMALL)
    finally:
        build_over.set()
        killer.join()

    assert killed, "the second group's worker was never seen"
    starts = [e for e in _events(run, "group_start") if e["layers"][-1] == 3]
    assert len(starts) == 2 and starts[0]["pid"] == killed[0] != starts[1]["pid"]  # retried in a new worker
    ends = [e for e in _events(run, "group_done") if e["layers"][-1] == 3]
    assert len(ends) == 1  # the killed worker never finished its group: the kill landed mid-work
    space = load_search_space("tiny", load_config(parent))
    assert store.missing_variants(run, space.variants()) == []
    done = [(e["layer"], e["kind"], e["variant"]) for e in _events(run, "variant_done")]
    assert len(done) == len(set(done)) == 12  # nothing trained twice: the first group was not redone
    assert summary["trained"] == 12
    undisturbed = write_blocks(tmp_path / "undisturbed")
    build_library(undisturbed, parent, tokens_per_block=20000, workers=1, ray=False, **SMALL)
    hashes = [{k: r.get("sha256") for k, r in store.read_manifest(r)["variants"].items()} for r in (run, undisturbed)]
    assert hashes[0] == hashes[1]  # the same tensors as a build nobody killed


def test_ray_job_submit_builds_the_library_on_a_local_head(tmp_path):
    parent = save_parent(tmp_path / "parent", layers=2)
    run = write_blocks(tmp_path / "run")
    job_dir = tmp_path / "job"  # the uploaded working dir: the package itself is installed in the venv
    job_dir.mkdir()
    with local_head(num_cpus=1, dashboard=True) as head:
        submit = subprocess.run(
            [str(RAY_BIN), "job", "submit", "--address", head.dashboard, "--working-dir", str(job_dir), "--",
             "puzzle", "build-library", "--run-dir", str(run), "--parent", str(parent), "--search-space", "tiny",
             "--tokens-per-block", "256", "--batch-size", "4", "--calibration-tokens", "256", "--eval-tokens", "128",
             "--workers", "2", "--threads", "1"],
            env=head.env, capture_output=True, text=True, timeout=1800,  # catches a hang only
        )
    assert submit.returncode == 0, submit.stdout[-2000:] + submit.stderr[-2000:]
    assert "succeeded" in submit.stdout + submit.stderr
    space = load_search_space("tiny", load_config(parent))
    assert store.missing_variants(run, space.variants()) == []
    records = store.read_manifest(run)["variants"]
    trained = [r for r in records.values() if r["source"] == "trained"]
    assert len(trained) == 4 and all(r["tokens"] >= 256 and r["steps"] == 2 for r in trained)
    hosts = {e["pid"] for e in _events(run, "group_start")}
    assert os.getpid() not in hosts  # trained in Ray workers, not here
