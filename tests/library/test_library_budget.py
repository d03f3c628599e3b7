"""BLD within a memory budget, reading only what it needs: a worker opens the embeddings and the layers up to
its last one; a per-worker budget splits layer groups into jobs of fewer variants and the same library
comes out, tensor for tensor."""

import pytest
from library_testing import SEQ_LEN, save_parent, write_blocks
from safetensors.torch import load_file

import puzzle.model.loading as loading
from puzzle.errors import PuzzleError
from puzzle.io import read_yaml
from puzzle.library import store
from puzzle.library.bld import BLDSettings, group_variants
from puzzle.library.commands import build_library
from puzzle.library.cost import bld_job_bytes, layer_costs, plan_jobs, split_layers
from puzzle.library.ray_jobs import GroupJob, run_group
from puzzle.model.checkpoint import load_config
from puzzle.footprint import GIB
from puzzle.search_space import build_search_space, resolve_space_path
from puzzle.shape import ModelShape

FAST = dict(search_space="tiny", tokens_per_block=256, batch_size=4, calibration_tokens=128, eval_tokens=64, threads=1)
SETTINGS = BLDSettings(tokens_per_block=256, batch_size=4, calibration_tokens=128, eval_tokens=64)


def _space(parent):
    path = resolve_space_path("tiny")
    return read_yaml(path), build_search_space(read_yaml(path), load_config(parent), path.stem)


class RecordingSafeOpen:
    """safetensors.safe_open, recording the name of every tensor whose data is read."""

    read: list[str] = []

    def __init__(self, *args, **kwargs):
        self.inner = _REAL_SAFE_OPEN(*args, **kwargs)

    def __enter__(self):
        self.handle = self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def keys(self):
        return self.handle.keys()

    def get_slice(self, name):
        return self.handle.get_slice(name)

    def metadata(self):
        return self.handle.metadata()

    def get_tensor(self, name):
        RecordingSafeOpen.read.append(name)
        return self.handle.get_tensor(name)


_REAL_SAFE_OPEN = loading.safe_open


def test_a_worker_reads_only_the_embeddings_and_the_layers_up_to_its_last(tmp_path, monkeypatch):
    parent = save_parent(tmp_path / "parent", layers=4)
    run = write_blocks(tmp_path / "run")
    raw, space = _space(parent)
    monkeypatch.setattr(loading, "safe_open", RecordingSafeOpen)
    RecordingSafeOpen.read = []
    job = GroupJob(str(run), str(parent), raw, "tiny", (1, 2), SETTINGS.to_dict(), 1)
    summary = run_group(job)
    assert summary["trained"] > 0
    stored = load_file(str(parent / "model.safetensors"))
    want = {"model.embed_tokens.weight"} | {k for k in stored if k.startswith(("model.layers.0.", "model.layers.1.",
                                                                                "model.layers.2."))}
    assert set(RecordingSafeOpen.read) == want  # no layer 3, no final norm, no lm_head
    assert len(RecordingSafeOpen.read) == len(want)  # each read once
    assert not store.missing_variants(run, group_variants(space, [1, 2]))


def test_without_a_budget_the_jobs_are_the_layer_groups(tmp_path):
    parent = save_parent(tmp_path / "parent", layers=4)
    _, space = _space(parent)
    config = load_config(parent)
    jobs = plan_jobs(space, config, SETTINGS, [0, 1, 2, 3], 2, SEQ_LEN)
    assert [list(j.layers) for j in jobs] == split_layers([0, 1, 2, 3], 2, *layer_costs(space, config, SETTINGS, SEQ_LEN))
    assert all(j.keys == () for j in jobs)


def _smallest_budget_gib(parent) -> float:
    """The budget of the largest single-variant job: every job then holds as few variants as can be."""
    _, space = _space(parent)
    shape = ModelShape.from_config(load_config(parent))
    return max(bld_job_bytes(shape, [v.layer], [v], SETTINGS, SEQ_LEN) for v in space.variants()) / GIB


def test_a_small_budget_builds_the_same_library_in_more_jobs(tmp_path):
    parent = save_parent(tmp_path / "parent", layers=3)
    runs = [write_blocks(tmp_path / name) for name in ("whole", "budgeted")]
    whole = build_library(runs[0], parent, workers=0, ray=False, **FAST)
    budget = _smallest_budget_gib(parent)
    budgeted = build_library(runs[1], parent, workers=0, ray=False, worker_memory_gib=budget, **FAST)
    assert len(budgeted["groups"]) > len(whole["groups"]) == 1
    assert budgeted["trained"] == whole["trained"] > 0
    files = [sorted(p.relative_to(r / "library") for p in (r / "library").rglob("*.safetensors")) for r in runs]
    assert files[0] == files[1] and files[0]
    for rel in files[0]:
        a, b = (load_file(str(r / "library" / rel)) for r in runs)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].equal(b[k]), (rel, k)
    records = [store.read_manifest(r)["variants"] for r in runs]
    assert {k: r.get("sha256") for k, r in records[0].items()} == {k: r.get("sha256") for k, r in records[1].items()}


def test_a_budget_below_one_variant_is_one_line(tmp_path):
    parent = save_parent(tmp_path / "parent", layers=2)
    run = write_blocks(tmp_path / "run")
    with pytest.raises(PuzzleError, match="worker-memory-gib to at least"):
        build_library(run, parent, workers=0, ray=False, worker_memory_gib=_smallest_budget_gib(parent) / 2, **FAST)
