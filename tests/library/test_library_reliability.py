"""build-library across runs: changed settings retrain only what they change, a rejected parent or search
space leaves the run directory usable, and two builds on one run directory never train a variant twice."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from library_testing import save_parent, write_blocks
from transformers import GPT2Config

from puzzle.cli import main
from puzzle.library import store
from puzzle.library.commands import build_library
from puzzle.model.fingerprint import fingerprint

REPO = Path(__file__).resolve().parents[2]
FAST = dict(search_space="tiny", tokens_per_block=512, batch_size=4, calibration_tokens=256, eval_tokens=128,
            threads=1, ray=False)
FAST_CLI = ["--search-space", "tiny", "--tokens-per-block", "512", "--batch-size", "4", "--calibration-tokens", "256",
            "--eval-tokens", "128", "--threads", "1", "--no-ray"]


def trained_keys(run: Path, prefix: str = "") -> set[str]:
    return {k for k, r in store.read_manifest(run)["variants"].items()
            if r["source"] == "trained" and k.startswith(prefix)}


def test_changed_settings_retrain_only_the_variants_they_produced(tmp_path):
    parent = save_parent(tmp_path / "parent", layers=3)
    run = write_blocks(tmp_path / "run")
    first = build_library(run, parent, **FAST)
    # the tiny space keeps layer 0 the parent's: layers 1 and 2 have trained variants
    trained, layer1 = trained_keys(run), trained_keys(run, "L001/")
    assert first["trained"] == len(trained) and layer1 and trained - layer1
    before = store.read_manifest(run)["variants"]

    # other tokens_per_block on layer 1 only: its trained variants are retrained, nothing else is touched
    assert build_library(run, parent, **{**FAST, "tokens_per_block": 1024}, layers=[1])["trained"] == len(layer1)
    after = store.read_manifest(run)["variants"]
    assert {k for k in before if after[k] != before[k]} == layer1
    assert {after[k]["tokens"] for k in layer1} != {before[k]["tokens"] for k in layer1}

    # settings that do not change results (workers, threads) redo nothing
    again = build_library(run, parent, **{**FAST, "tokens_per_block": 1024, "workers": 2, "threads": 2}, layers=[1])
    assert again["trained"] == 0
    # the whole library under the new settings: only layer 2's variants are left to retrain
    assert build_library(run, parent, **{**FAST, "tokens_per_block": 1024})["trained"] == len(trained - layer1)
    assert build_library(run, parent, **{**FAST, "tokens_per_block": 1024})["trained"] == 0


def test_a_rejected_parent_or_search_space_leaves_the_run_directory_usable(tmp_path, capsys):
    parent = save_parent(tmp_path / "parent", layers=2)
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=320).save_pretrained(gpt2)
    bad_space = tmp_path / "bad_space.yaml"
    bad_space.write_text("attention: {kv_heads: [3]}\n")  # 3 KV heads cannot serve the parent's 4 query heads
    run = write_blocks(tmp_path / "run")
    base = ["build-library", "--run-dir", str(run), *FAST_CLI, "--layers", "1"]

    assert main([*base, "--parent", str(gpt2)]) == 2
    assert "unsupported architecture 'gpt2'" in capsys.readouterr().err
    assert main([*base, "--parent", str(parent), "--search-space", "no_such_space"]) == 2
    assert "unknown search space" in capsys.readouterr().err
    assert main([*base, "--parent", str(parent), "--search-space", str(bad_space)]) == 2
    capsys.readouterr()
    assert not (run / "parent.json").exists()

    assert main([*base, "--parent", str(parent)]) == 0
    assert json.loads((run / "parent.json").read_text()) == {"parent": str(parent.resolve()), "search_space": "tiny",
                                                             "parent_fingerprint": fingerprint(parent)}


BUILD = """
import sys
from puzzle.cli import main
sys.exit(main(["build-library", "--run-dir", sys.argv[1], "--parent", sys.argv[2], *sys.argv[3:]]))
"""


@pytest.mark.slow
def test_two_concurrent_builds_train_each_variant_once(tmp_path):
    parent = save_parent(tmp_path / "parent", layers=2)
    run = write_blocks(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    slow = [*FAST_CLI, "--tokens-per-block", "32768"]  # long enough for the two builds to overlap
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(run), str(parent), *slow], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    # communicate reads both pipes while it waits (wait() alone could stall on a full one); the ceiling only
    # catches a hang, however busy the machine
    streams = [p.communicate(timeout=1800) for p in procs]
    outs = [(p.returncode, out, err) for p, (out, err) in zip(procs, streams)]
    assert sorted(rc for rc, _, _ in outs) in ([0, 0], [0, 2]), outs
    for rc, _, err in outs:
        if rc == 2:  # the second writer is told who holds the library, in one line
            line = err.strip().splitlines()[-1]
            assert "build_library" in line and f"pid " in line and "since" in line, err
    done = [json.loads(line) for line in (run / "library" / "log.jsonl").read_text().splitlines()]
    finished = [f"{r['layer']}/{r['kind']}/{r['variant']}" for r in done if r["event"] == "variant_done"]
    assert len(finished) == len(set(finished)) == len(trained_keys(run))


def test_a_library_from_before_settings_digests_is_kept_when_its_header_matches(tmp_path):
    parent = save_parent(tmp_path / "parent", layers=2)
    run = write_blocks(tmp_path / "run")
    build_library(run, parent, **FAST)
    manifest = store.read_manifest(run)
    for record in manifest["variants"].values():
        record.pop("settings_sha256", None)  # as written before entries carried their settings
    store.manifest_path(run).write_text(json.dumps(manifest))
    assert build_library(run, parent, **FAST)["trained"] == 0
    assert all("settings_sha256" in store.read_manifest(run)["variants"][k] for k in trained_keys(run))
    assert build_library(run, parent, **{**FAST, "lr": 1e-3})["trained"] == len(trained_keys(run))
