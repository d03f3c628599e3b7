"""Each stage's cost model (puzzle/<package>/cost.py), reached through its registry entry, reads its stage's
own parameters; BLD's FLOPs and a BLD job's Ray request follow one rule each."""

import ast
import inspect
import textwrap
from dataclasses import fields

import pytest

from puzzle.footprint import PROCESS_BASELINE_BYTES, Context, stage_settings
from puzzle.library import cost as bld_cost
from puzzle.stages import STAGES

COSTED = [s for s in STAGES if s.cost]


def settings_reads(fn, settings: str | None = None) -> set[str]:
    """The attributes `fn` reads of its settings argument (`settings`; a cost model `f(ctx, s)`'s second)
    anywhere in its body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    settings = settings or tree.body[0].args.args[1].arg
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == settings}


def unknown_reads(stage) -> set[str]:
    return settings_reads(stage.estimator()) - set(inspect.signature(stage.load()).parameters)


def test_every_modelled_stage_has_a_cost_model_beside_it():
    """The model-sized stages are priced, each by a module of its own package; the rest say so."""
    assert {s.name for s in COSTED} == {"convert", "prepare_data", "correct_teacher", "importance", "build_library",
                                        "score", "profile", "solve", "realize", "distill", "prune", "evaluate"}
    for stage in COSTED:
        package = stage.target.split(":")[0].rpartition(".")[0]
        assert stage.cost.startswith(f"{package}.cost:"), stage.cost


@pytest.mark.parametrize("stage", COSTED, ids=lambda s: s.name)
def test_a_cost_model_reads_only_its_stage_parameters(stage):
    """Every name a cost model reads of its settings is a parameter of its stage's function, on every path
    (read from the source, not from a run): renaming a parameter fails here."""
    assert unknown_reads(stage) == set()


def test_a_cost_module_helper_reads_only_its_stage_parameters():
    """The same for a cost module's helpers that take a stage's settings `s` (prepare-data's `train_tokens`,
    read by the planner for every later stage's context)."""
    import importlib

    by_module: dict[str, set[str]] = {}
    for stage in COSTED:
        by_module.setdefault(stage.cost.split(":")[0], set()).update(inspect.signature(stage.load()).parameters)
    estimators = {stage.cost.split(":")[1] for stage in COSTED}
    checked = 0
    for name, params in by_module.items():
        module = importlib.import_module(name)
        for fn_name, fn in inspect.getmembers(module, inspect.isfunction):
            if fn.__module__ == name and fn_name not in estimators and "s" in inspect.signature(fn).parameters:
                assert settings_reads(fn, "s") <= params, (name, fn_name)
                checked += 1
    assert checked >= 1  # train_tokens at least


def test_the_check_catches_a_renamed_parameter(monkeypatch):
    """The rule above can fail: a cost model reading a parameter its stage does not have."""
    stage = next(s for s in COSTED if s.name == "importance")

    def renamed(ctx, s):
        return s.drop_sample > 0

    assert "drop_samples" in settings_reads(stage.estimator())  # the real one's reads are seen
    monkeypatch.setattr(type(stage), "estimator", lambda self: renamed)
    assert unknown_reads(stage) == {"drop_sample"}


def test_settings_are_the_signature_defaults_and_refuse_what_it_lacks():
    from puzzle.errors import PuzzleError

    def stage(batch_size: int = 8, device: str = "auto", model=None):
        pass

    s = stage_settings(stage, {"batch_size": 2})
    assert (s.batch_size, s.device, s.model) == (2, "auto", None)
    with pytest.raises(AttributeError):
        s.batch
    with pytest.raises(PuzzleError, match="takes no argument batch"):
        stage_settings(stage, {"batch": 2})


def test_the_bld_recipe_is_build_library_parameters_and_bld_settings_fields():
    """What BLD's cost model reads of a recipe exists under one name in both places it comes from: the plan's
    (`build_library`'s arguments) and a Ray job's (`BLDSettings`)."""
    from puzzle.library.bld import BLDSettings
    from puzzle.library.commands import build_library

    wanted = set(bld_cost.Recipe.__annotations__)
    assert wanted <= set(inspect.signature(build_library).parameters)
    assert wanted <= {f.name for f in fields(BLDSettings)}
    # and the cost module's functions that take a recipe read only what the protocol names
    readers = [fn for _, fn in inspect.getmembers(bld_cost, inspect.isfunction) if fn.__module__ == bld_cost.__name__]
    reads = {name: settings_reads(fn, arg) for fn in readers for name in [fn.__name__]
             for arg in ("settings", "recipe") if arg in inspect.signature(fn).parameters}
    assert {"bld_job_bytes", "layer_costs", "steps", "worker_estimate"} <= set(reads)
    assert all(r <= wanted for r in reads.values()), reads


def _windowed_config(window):
    from transformers import MistralConfig

    return MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, sliding_window=window)


def test_bld_flops_count_a_layer_window_and_the_matmul_weights():
    """One FLOP rule for BLD (the plan, the worker split and bld.py's own accounting): an attention variant's
    scores see at most its window (a windowed parent's variants keep its layer's), and the split's per-layer
    costs are the same function's."""
    from puzzle.search_space import load_search_space
    from puzzle.shape import ModelShape

    T = 512
    flops = {}
    for window in (None, 16):
        config = _windowed_config(window)
        shape, space = ModelShape.from_config(config), load_search_space("tiny", config)
        attn = next(v for v in space.variants() if v.kind == "attention" and not v.is_parent and not v.config.no_op)
        flops[window] = bld_cost.variant_train_flops(shape, attn, T)
        settings = type("S", (), dict(tokens_per_block=1024, calibration_tokens=64, eval_tokens=64))
        forward, train = bld_cost.layer_costs(space, config, settings, T)
        assert train[attn.layer] == 1024 * sum(bld_cost.variant_train_flops(shape, v, T) for v in space.variants()
                                               if v.layer == attn.layer)
        assert forward[0] == bld_cost.parent_layer_flops(shape, 0, T) * (1024 + 64 + 64)
    assert attn.config.window == 16  # the windowed parent's variants keep its layer's window
    shape = ModelShape.from_config(_windowed_config(None))
    scores = 3 * shape.attention_flops(attn.config.with_window(None), T / 2)
    assert flops[None] - flops[16] == pytest.approx(scores - scores * 16 / (T / 2))


@pytest.mark.parametrize("budgeted", [False, True], ids=["groups", "budgeted"])
@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_a_bld_job_requests_what_the_plan_prices_one_worker_at(tmp_path, gpu, budgeted):
    """One request rule for a BLD job, budgeted or not: the worker process's baseline plus, on the CPU, the
    job's bytes (less the mapped embedding table), on a GPU cluster the truncated parent it loads (not the
    GPU's bytes again); the GPU share from the job's bytes."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "library"))
    from library_testing import SEQ_LEN, save_parent, write_blocks

    from puzzle import cluster
    from puzzle.library.bld import BLDSettings
    from puzzle.library.ray_jobs import GroupJob, job_requests
    from puzzle.model.checkpoint import load_config
    from puzzle.search_space import load_search_space

    parent, run = save_parent(tmp_path / "parent", layers=3), write_blocks(tmp_path / "run")
    config = load_config(parent)
    space = load_search_space("tiny", config)
    settings = BLDSettings(tokens_per_block=256, batch_size=4, device="auto" if gpu else "cpu",
                           dtype="bf16" if gpu else "fp32")
    node = {"CPU": 8.0, "memory": 64 * 2**30, **({"GPU": 1.0} if gpu else {})}
    info = cluster.ClusterInfo((node,), gpu_bytes=80 * 2**30 if gpu else None)
    ctx = Context.one_worker(config, space, SEQ_LEN, "cuda" if gpu else "cpu")
    budget = max(bld_cost.bld_job_bytes(ctx.shape, [v.layer], [v], settings, SEQ_LEN) for v in space.variants())
    jobs = bld_cost.plan_jobs(space, config, settings, [0, 1, 2], 2, SEQ_LEN, budget if budgeted else None)
    assert all(j.keys for j in jobs) == budgeted  # a budgeted build's jobs are variant subsets
    groups = [GroupJob(str(run), str(parent), {}, "tiny", j.layers, settings.to_dict(), 1, j.keys) for j in jobs]
    requests = job_requests(groups, space, info)
    e = 2 if gpu else 4
    for job, request in zip(jobs, requests):
        if gpu:
            loaded = bld_cost.truncated_parent_bytes(ctx.shape, max(job.layers), e)
            assert request.memory == PROCESS_BASELINE_BYTES + loaded < PROCESS_BASELINE_BYTES + job.bytes
            assert request.num_gpus == cluster.gpu_share(job.bytes, info.gpu_bytes)
        else:
            unread = ctx.shape.fixed_params("embeddings") * 4
            assert request.memory == PROCESS_BASELINE_BYTES + job.bytes - unread and request.num_gpus == 0


def test_a_score_worker_job_is_priced_as_its_stage_settings():
    """A Ray score worker's request is `score_cost` of its `ScoreJob` (scoring/ray_jobs.py): the job carries
    every setting the cost model reads, under the stage's own names."""
    from puzzle.scoring.cost import score_cost
    from puzzle.scoring.ray_jobs import ScoreJob

    assert settings_reads(score_cost) <= {f.name for f in fields(ScoreJob)}


def test_the_footprint_vocabulary_imports_no_torch():
    """puzzle/footprint.py sits below every stage: importing it (and the registry) loads no torch."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, puzzle.footprint, puzzle.stages; assert 'torch' not in sys.modules, 'torch'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
