"""`puzzle plan` on real published shapes (Llama-3.1-8B / -70B config.json written here, no weights)."""

import json

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import REFERENCE_GGUF, REPO, requires_reference
from puzzle import plan as planner
from puzzle.cli import main

ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
# Meta's published config.json dimensions
LLAMA_31 = {
    "8b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 14336},
    "70b": {"hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
            "intermediate_size": 28672},
}
FAST = ["--cpu-gflops", "100"]  # no matmul timing in tests


def write_parent(root, size: str):
    config = LlamaConfig(vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=ROPE, tie_word_embeddings=False, **LLAMA_31[size])
    out = root / f"llama-3.1-{size}"
    config.save_pretrained(out)  # config.json only: no weights anywhere
    return out, config


def write_pipeline(root, parent, **sections):
    config = {"run_dir": str(root / "run"), "parent": str(parent), "corpus": str(root / "corpus"),
              "search_space": "llama_default", "prepare_data": {"seq_len": 256, "max_tokens": 1_000_000},
              "importance": {"n_samples": 64},
              "build_library": {"tokens_per_block": 8192, "batch_size": 8, "workers": 2},
              "score": {"blocks": 4, "batch_size": 4},
              "solve": [{"budget": "h100_80gb", "speedup": 1.5, "name": "s"}], "realize": [{"solution": "s"}],
              "gkd": {"steps": 16, "batch_size": 4}, "evaluate": {"val_blocks": 16, "batch_size": 4}, **sections}
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def meta_params(config: LlamaConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def run_plan(tmp_path, size: str, *flags: str, **sections) -> dict:
    parent, _ = write_parent(tmp_path, size)
    out = tmp_path / f"{size}.json"
    assert main(["plan", str(write_pipeline(tmp_path, parent, **sections)), *FAST, "--json", str(out), *flags]) == 0
    return json.loads(out.read_text())


def by_stage(result: dict) -> dict:
    return {s["step"]: s for s in result["steps"]}


@pytest.mark.parametrize("size", ["8b", "70b"])
def test_parameter_count_matches_transformers(tmp_path, size):
    _, config = write_parent(tmp_path, size)
    result = run_plan(tmp_path, size, "--device", "cpu")
    assert result["parent"]["params"] == meta_params(config)
    assert result["parent"]["fp32_bytes"] == 4 * meta_params(config)


def test_memory_scales_with_the_parent(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    small, large = run_plan(tmp_path / "a", "8b", "--device", "cpu"), run_plan(tmp_path / "b", "70b", "--device", "cpu")
    s, l = by_stage(small), by_stage(large)
    ratio = large["parent"]["params"] / small["parent"]["params"]
    # realize streams the child into a meta-built model: one parent-sized model (the parent bounds the child)
    for r in (small, large):
        assert by_stage(r)["realize[s]"]["host_bytes"] == r["parent"]["fp32_bytes"]
    # weight-dominated stages grow with the parameters (activations of the same batch grow with hidden only)
    for step in ("gkd[s]", "evaluate[parent]", "score", "importance"):
        assert 0.8 * ratio < l[step]["host_bytes"] / s[step]["host_bytes"] < 1.1 * ratio, step
    # GKD: teacher + student with gradient and two AdamW moments + the checkpoint write: more than 6x the parent
    assert s["gkd[s]"]["host_bytes"] > 6 * small["parent"]["fp32_bytes"]


def test_a_worker_memory_budget_splits_the_build_into_jobs_that_fit(tmp_path):
    bld = {"tokens_per_block": 8192, "workers": 2}
    whole = by_stage(run_plan(tmp_path, "8b", "--device", "cpu", build_library=bld))["build_library"]
    per_worker = whole["host_bytes"] / whole["workers"]
    budget = per_worker / 3 / 2**30
    split = by_stage(run_plan(tmp_path, "8b", "--device", "cpu",
                              build_library={**bld, "worker_memory_gib": budget}))["build_library"]
    assert split["host_bytes"] / split["workers"] <= budget * 2**30 < per_worker
    assert split["disk_bytes"] == whole["disk_bytes"]  # the same variants, in more jobs
    assert int(split["note"].split()[0]) > int(whole["note"].split()[0])


def test_build_library_memory_grows_with_workers(tmp_path):
    one = by_stage(run_plan(tmp_path, "8b", "--device", "cpu", build_library={"tokens_per_block": 8192, "workers": 1}))
    four = by_stage(run_plan(tmp_path, "8b", "--device", "cpu", build_library={"tokens_per_block": 8192, "workers": 4}))
    assert (one["build_library"]["workers"], four["build_library"]["workers"]) == (1, 4)
    # each worker loads its own parent: four workers need more in all, each less than the single one
    assert four["build_library"]["host_bytes"] > one["build_library"]["host_bytes"]
    assert four["build_library"]["host_bytes"] / 4 < one["build_library"]["host_bytes"]
    # the same variants are trained and stored either way
    assert four["build_library"]["disk_bytes"] == one["build_library"]["disk_bytes"]


def test_small_gpu_warns_and_exits_zero(tmp_path, capsys):
    roomy = ["--device", "cuda", "--gpus", "1", "--host-memory-gib", "100000"]
    run_plan(tmp_path, "8b", *roomy, "--gpu-memory-gib", "1000")
    assert "warning:" not in capsys.readouterr().out
    result = run_plan(tmp_path, "8b", *roomy, "--gpu-memory-gib", "16")
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: score needs ~{:.1f} GiB of GPU memory; 16.0 GiB per GPU available".format(
        by_stage(result)["score"]["gpu_bytes"] / 2**30)]
    assert by_stage(result)["score"]["gpu_bytes"] > result["parent"]["fp32_bytes"]


def test_small_host_warns(tmp_path, capsys):
    run_plan(tmp_path, "8b", "--device", "cpu", "--host-memory-gib", "16")
    warned = {line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")}
    assert {"build_library", "score", "gkd[s]", "realize[s]"} <= warned


def test_user_mistakes_exit_2(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "missing.yaml"), *FAST]) == 2
    parent, _ = write_parent(tmp_path, "8b")
    config = write_pipeline(tmp_path, parent)
    assert main(["plan", str(config), *FAST, "--gpus", "0", "--device", "cuda"]) == 2
    bad = write_pipeline(tmp_path, parent, score={"blocks": -1})
    assert main(["plan", str(bad), *FAST, "--device", "cpu"]) == 2
    assert capsys.readouterr().err.count("puzzle: error:") == 3


def test_cpu_rate_is_measured():
    assert planner.measure_cpu_flops(n=64, seconds=0.01) > 0


# ----- calibration: plan's host estimate against a measured peak on this machine ------------------------

_MEASURE = """
import json, sys
from puzzle.cli import main
from puzzle.evaluate import commands  # noqa: F401  (imports out of the measured window)
from puzzle.library import bld, commands as library_commands, ray_jobs  # noqa: F401
from puzzle.distill import commands as distill_commands, trainer  # noqa: F401
from puzzle.scoring import commands as scoring_commands, replace1  # noqa: F401
from puzzle.model.checkpoint import load_model  # noqa: F401

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

try:
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
except OSError:
    pass
before = status("VmRSS:")
code = main(sys.argv[1:])
print(json.dumps({"code": code, "before": before, "peak": status("VmHWM:")}))
"""


DIMS = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=4)  # ~34M parameters: 134 MB in fp32, well above torch's own noise


@pytest.fixture(scope="module")
def medium_run(tmp_path_factory):
    """Two random ~34M-parameter Llama directories and a run directory of 32-token blocks (shared: each
    test writes its own outputs into it)."""
    from conftest import SAMPLE_TEXT, make_llama, make_tokenizer
    from puzzle.data.prepare import prepare_blocks

    tmp_path, tiny_tokenizer = tmp_path_factory.mktemp("medium"), make_tokenizer()

    for name in ("parent", "child"):
        make_llama(**DIMS).save_pretrained(tmp_path / name, safe_serialization=True)
        tiny_tokenizer.save_pretrained(tmp_path / name)
    run = tmp_path / "run"
    prepare_blocks([t * 20 for t in SAMPLE_TEXT], tiny_tokenizer, run / "data", seq_len=32, val_fraction=0.4)
    return tmp_path


def measured_growth(*argv: str) -> int:
    """Peak RSS growth (bytes) of `puzzle ARGV` in a fresh process, over its RSS after the imports."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _MEASURE, *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["code"] == 0, done.stderr
    return measured["peak"] - measured["before"]


def estimated(root, stage: str, space: str, **args) -> float:
    from puzzle.model.checkpoint import load_config
    from puzzle.search_space import load_search_space
    from puzzle.shape import ModelShape
    from puzzle.stages import BY_NAME

    config = load_config(root / "parent")
    cpu = planner.Machine("cpu", 0, host_bytes=0, gpu_bytes=0, cpu_flops=1, gpu_flops=0, throughput_note="")
    ctx = planner.Context(config, ModelShape.from_config(config), load_search_space(space, config), 32, 0, cpu)
    return planner.ESTIMATORS[stage](ctx, planner.stage_arguments(BY_NAME[stage].load(), args)).host_bytes


def test_evaluate_host_estimate_matches_a_measured_peak(medium_run):
    """`puzzle evaluate` of a child next to its parent (two directories, both loaded): measured 276 MiB,
    estimated 276 MiB on this machine."""
    root = medium_run
    growth = measured_growth("evaluate", str(root / "child"), "--parent", str(root / "parent"), "--run-dir",
                             str(root / "run"), "--budget", "none", "--no-measure", "--val-blocks", "8", "--batch-size", "4")
    estimate = estimated(root, "evaluate", "llama_default", val_blocks=8, batch_size=4)
    assert 2 / 3 < growth / estimate < 1.5, (growth / 2**20, estimate / 2**20)


def test_build_library_and_score_host_estimates_match_measured_peaks(medium_run):
    """`puzzle build-library --no-ray` (one worker, every layer) on the tiny search space, then `puzzle score`:
    measured 528 and 267 MiB, estimated 520 and 256 MiB on this machine."""
    root = medium_run
    bld = dict(tokens_per_block=256, batch_size=4, calibration_tokens=1024, eval_tokens=128)  # least squares: >= D
    flags = [x for k, v in bld.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    growth = measured_growth("build-library", "--run-dir", str(root / "run"), "--parent", str(root / "parent"),
                             "--search-space", "tiny", "--no-ray", "--threads", "1", *flags)
    estimate = estimated(root, "build_library", "tiny", workers=1, ray=False, **bld)
    assert 2 / 3 < growth / estimate < 1.5, (growth / 2**20, estimate / 2**20)
    # then `puzzle score` of that library (its peak: to_puzzle's two copies of the parent)
    growth = measured_growth("score", "--run-dir", str(root / "run"), "--blocks", "4", "--batch-size", "4")
    estimate = estimated(root, "score", "tiny", blocks=4, batch_size=4)
    assert 2 / 3 < growth / estimate < 1.5, (growth / 2**20, estimate / 2**20)


def test_distill_host_estimate_matches_a_measured_peak(medium_run):
    """`puzzle distill` (GKD) of a heterogeneous child (as realize writes it) from a plain Llama parent, with a
    checkpoint: measured 1595 MiB, estimated 1536 MiB on this machine (867 before the estimator counted the
    checkpoint's serialised AdamW moments)."""
    root = medium_run
    assert main(["convert", str(root / "child"), str(root / "student")]) == 0
    gkd = dict(steps=2, batch_size=4, val_every=2, val_blocks=2, checkpoint_every=2, hidden_loss="cosine")
    flags = [x for k, v in gkd.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    growth = measured_growth("distill", "--teacher", str(root / "parent"), "--student", str(root / "student"),
                             "--run-dir", str(root / "run"), "--out", str(root / "gkd"), *flags)
    estimate = estimated(root, "distill", "llama_default", **gkd)
    assert 2 / 3 < growth / estimate < 1.5, (growth / 2**20, estimate / 2**20)


@requires_reference
@pytest.mark.smoke
def test_plan_of_the_shipped_config_reads_the_gguf_metadata_only(monkeypatch, tmp_path):
    """The quick config's GGUF parent: its config from the metadata, never a tensor."""
    import puzzle.model.checkpoint as checkpoint

    def no_weights(*args, **kwargs):
        raise AssertionError("plan loaded weights")

    monkeypatch.setattr(checkpoint, "load_model", no_weights)
    out = tmp_path / "plan.json"
    assert main(["plan", str(REPO / "configs" / "smollm2_quick.yaml"), *FAST, "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    config = checkpoint.load_config(REFERENCE_GGUF)
    assert result["parent"]["params"] == meta_params(config)
    assert [s["step"] for s in result["steps"]][:2] == ["convert_parent", "prepare_data"]
