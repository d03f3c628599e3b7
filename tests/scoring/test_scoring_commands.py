"""`puzzle score` on a tiny parent and a fake library built with the store's own API: the table, resuming
(nothing recomputed, a torn log, a changed library entry) and one-line errors."""

import json

import numpy as np
import pandas as pd
import pytest
from scoring_testing import random_state

from puzzle.cli import main
from puzzle.data.blocks import iterate_batches, load_blocks
from puzzle.evaluate.commands import evaluate
from puzzle.io import read_table
from puzzle.library import store
from puzzle.library.store import key_of, record_untrained, variant_state, write_variant
from puzzle.model.checkpoint import load_model, to_puzzle
from puzzle.scoring import commands, replace1
from puzzle.scoring.replace1 import score_variants
from puzzle.search_space import load_search_space

SEQ_LEN = 12
ARGS = ["--search-space", "tiny", "--blocks", "5", "--batch-size", "2", "--chunk-tokens", "16"]


def write_data(run_dir, n_val=6):
    """Prepared data as `puzzle prepare-data` lays it out: random ids in train/val .bin + meta.json."""
    out = run_dir / "data"
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", n_val)):
        rng.integers(3, 320, size=(n, SEQ_LEN), dtype=np.uint32).tofile(out / f"{split}.bin")
    meta = {"seq_len": SEQ_LEN, "dtype": "uint32", "n_train_blocks": 4, "n_val_blocks": n_val, "fingerprint": "test"}
    (out / "meta.json").write_text(json.dumps(meta))


def write_library(run_dir, parent, space):
    untrained = []
    for v in space.variants():
        if v.is_parent or v.config.no_op:
            untrained.append({"layer": v.layer, "kind": v.kind, "variant": v.name, "source": "parent" if v.is_parent else "noop"})
        else:
            write_variant(run_dir, {"layer": v.layer, "kind": v.kind, "variant": v.name}, random_state(parent.config, v))
    record_untrained(run_dir, untrained)


@pytest.fixture
def run(tmp_path, tiny_parent_dir):
    run_dir = tmp_path / "run"
    write_data(run_dir)
    parent = to_puzzle(load_model(tiny_parent_dir))
    space = load_search_space("tiny", parent.config)
    write_library(run_dir, parent, space)
    return run_dir, parent, space


class Counter:
    """Wraps `score_batch` in the command's namespace and counts the (variant, batch) results it yields."""

    def __init__(self, monkeypatch):
        self.calls = 0
        inner = replace1.score_batch

        def counting(*args, **kwargs):
            for item in inner(*args, **kwargs):
                self.calls += 1
                yield item

        monkeypatch.setattr(replace1, "score_batch", counting)


def test_score_writes_the_table_and_json(run, tiny_parent_dir):
    run_dir, parent, space = run
    assert main(["score", "--run-dir", str(run_dir), "--parent", str(tiny_parent_dir), *ARGS]) == 0
    table = read_table(run_dir / "scores" / "scores.parquet")
    assert list(table.columns) == ["layer", "kind", "variant", "kl", "lm_loss", "top1_agreement", "cosine", "tokens"]
    assert len(table) == len(space) and (table["tokens"] == 5 * SEQ_LEN).all()
    assert list(zip(table.layer, table.kind, table.variant)) == [(v.layer, v.kind, v.name) for v in space.variants()]
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "scores" / "scores.csv"), table, check_dtype=False)
    report = json.loads((run_dir / "scores" / "scores.json").read_text())
    is_parent = [v.is_parent for v in space.variants()]
    assert (table[is_parent]["kl"].abs() <= 1e-6).all()
    assert np.allclose(table[is_parent]["lm_loss"], report["parent_lm_loss"], atol=1e-6)
    assert (table[[not p for p in is_parent]]["kl"] > 0).all()
    assert report["rows"] == table.to_dict("records") and report["search_space"] == "tiny"
    # the same numbers as the in-memory scorer over the same sample of validation blocks
    batches = iterate_batches(load_blocks(run_dir, "val"), 2, shuffle=True, seed=0, limit=5)
    rows, _ = score_variants(parent, batches, space.variants(), lambda v: variant_state(run_dir, parent, v),
                             chunk_tokens=16, progress=False)
    assert np.allclose(table[["kl", "lm_loss", "top1_agreement", "cosine"]].to_numpy(),
                       pd.DataFrame(rows)[["kl", "lm_loss", "top1_agreement", "cosine"]].to_numpy(), atol=1e-6)
    # parent and search space are remembered for the stages after this one
    assert json.loads((run_dir / "parent.json").read_text())["search_space"] == "tiny"


def test_score_resumes(run, tiny_parent_dir, monkeypatch):
    run_dir, parent, space = run
    base = ["score", "--run-dir", str(run_dir), "--parent", str(tiny_parent_dir), *ARGS]
    count = Counter(monkeypatch)
    assert main(base) == 0
    n_batches = 3  # 5 blocks in batches of 2, 2, 1
    assert count.calls == len(space) * n_batches
    first = read_table(run_dir / "scores" / "scores.parquet")

    # a second run computes nothing and does not even load the parent
    monkeypatch.setattr(commands, "load_puzzle", lambda *a, **k: pytest.fail("the parent was loaded"))
    count.calls = 0
    assert main(["score", "--run-dir", str(run_dir), "--blocks", "5", "--batch-size", "2"]) == 0  # parent, space recorded
    assert count.calls == 0
    monkeypatch.undo()

    # a crash: the last 4 results are lost and the last line is torn
    count = Counter(monkeypatch)
    partial = run_dir / "scores" / "partial.jsonl"
    lines = partial.read_text().splitlines()
    partial.write_text("\n".join(lines[:-4]) + "\n" + lines[-4][:10])
    assert main(base) == 0
    assert count.calls == 4
    pd.testing.assert_frame_equal(read_table(run_dir / "scores" / "scores.parquet"), first)

    # a retrained library entry is scored again on every batch, and only it
    v = next(v for v in space.variants() if v.layer == 2 and v.name == "ffn_64")
    state = {k: t * 1.5 for k, t in random_state(parent.config, v).items()}
    write_variant(run_dir, {"layer": v.layer, "kind": v.kind, "variant": v.name}, state)
    count.calls = 0
    assert main(base) == 0
    assert count.calls == n_batches
    second = read_table(run_dir / "scores" / "scores.parquet")
    changed = (second[["kl", "lm_loss"]] != first[["kl", "lm_loss"]]).any(axis=1)
    assert list(second[changed].itertuples(index=False, name=None))[0][:3] == (2, "ffn", "ffn_64")
    assert changed.sum() == 1

    # other settings: everything again
    count.calls = 0
    assert main([*base, "--seed", "1"]) == 0
    assert count.calls == len(space) * n_batches


def test_score_errors_are_one_line(tmp_path, tiny_parent_dir, tiny_parent, capsys):
    def fails(args, *needles):
        capsys.readouterr()
        assert main(["score", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("puzzle: error:"), err
        for needle in needles:
            assert needle in err, err

    empty = tmp_path / "empty"
    fails(["--run-dir", str(empty), "--parent", str(tiny_parent_dir)], "prepare-data")
    run_dir = tmp_path / "run"
    write_data(run_dir)
    fails(["--run-dir", str(run_dir)], "--parent")
    fails(["--run-dir", str(run_dir), "--parent", str(tiny_parent_dir), "--search-space", "tiny"], "run puzzle build-library")
    space = load_search_space("tiny", tiny_parent.config)
    write_library(run_dir, tiny_parent, space)
    v = next(v for v in space.variants() if v.name == "ffn_64")
    (run_dir / "library" / f"{key_of(v)}.safetensors").unlink()
    fails(["--run-dir", str(run_dir)], "run puzzle build-library", key_of(v))
    fails(["--run-dir", str(run_dir), "--search-space", "nope"], "unknown search space")
    fails(["--run-dir", str(run_dir), "--search-space", "tiny", "--blocks", "0"], "--blocks")


def test_the_parent_row_agrees_with_evaluate_on_the_same_tokens(run, tiny_parent_dir):
    """`puzzle score` samples validation blocks (shuffled, `--blocks`), `puzzle evaluate` takes the first
    `val_blocks`: over every validation block both see the same tokens, and the parent's LM loss (and KL 0,
    agreement 1) must then be one number, whichever stage computed it."""
    run_dir, parent, space = run
    n_val = len(load_blocks(run_dir, "val"))
    assert main(["score", "--run-dir", str(run_dir), "--parent", str(tiny_parent_dir), "--search-space", "tiny",
                 "--blocks", str(n_val), "--batch-size", "4", "--chunk-tokens", "16"]) == 0
    scored = json.loads((run_dir / "scores" / "scores.json").read_text())["parent_metrics"]
    table = read_table(run_dir / "scores" / "scores.parquet")
    parent_rows = table[[v.is_parent for v in space.variants()]]
    evaluated = evaluate(tiny_parent_dir, tiny_parent_dir, run_dir, val_blocks=n_val, batch_size=3, budget=None,
                         measure=False)["validation"]
    assert evaluated["tokens"] == scored["tokens"] == n_val * SEQ_LEN
    assert evaluated["lm_loss"] == pytest.approx(scored["lm_loss"], rel=1e-5)
    assert np.allclose(parent_rows["lm_loss"], evaluated["lm_loss"], rtol=1e-5)
    assert evaluated["kl"] == pytest.approx(0.0, abs=1e-6) and (parent_rows["kl"] == 0).all()
    assert evaluated["top1_agreement"] == 1.0 and (parent_rows["top1_agreement"] == 1.0).all()


def test_bf16_scores_and_evaluation_match_fp32_within_bf16_rounding(run, tiny_parent_dir, monkeypatch):
    """--dtype bf16 end to end on the inference side: the parent and every variant held in bf16, metrics in
    fp32. The table is fp32's within bf16 rounding, and a bf16 table is not an fp32 one (rescored, not reused)."""
    run_dir, parent, space = run
    base = ["score", "--run-dir", str(run_dir), "--parent", str(tiny_parent_dir), *ARGS]
    assert main([*base, "--dtype", "fp32"]) == 0
    fp32 = read_table(run_dir / "scores" / "scores.parquet")
    count = Counter(monkeypatch)
    assert main([*base, "--device", "cpu", "--dtype", "bf16"]) == 0
    assert count.calls > 0  # the fp32 results were not taken for bf16 ones
    bf16 = read_table(run_dir / "scores" / "scores.parquet")
    settings = json.loads((run_dir / "scores" / "scores.json").read_text())["settings"]
    assert settings["dtype"] == "bf16" and settings["device"] == "cpu"
    assert np.allclose(bf16["lm_loss"], fp32["lm_loss"], rtol=0.01)
    assert np.allclose(bf16["kl"], fp32["kl"], rtol=0.1, atol=0.01)
    assert not np.array_equal(bf16["lm_loss"], fp32["lm_loss"])  # it did compute in bf16
    n_val = len(load_blocks(run_dir, "val"))
    ev = {dtype: evaluate(tiny_parent_dir, None, run_dir, val_blocks=n_val, batch_size=3, budget=None, measure=False,
                          dtype=dtype)
          for dtype in ("fp32", "bf16")}
    assert ev["bf16"]["dtype"] == "bf16" and ev["fp32"]["dtype"] == "fp32"
    assert ev["bf16"]["validation"]["lm_loss"] == pytest.approx(ev["fp32"]["validation"]["lm_loss"], rel=0.01)


def test_each_library_file_is_read_and_verified_once_per_run(run, tiny_parent_dir, monkeypatch):
    """5 blocks in batches of 2: 3 batches visit every variant, yet each file is read and hashed once (the
    whole library kept: see the next test for one over `KEEP_LIBRARY`)."""
    run_dir, parent, space = run
    monkeypatch.setattr(replace1, "KEEP_LIBRARY", float("inf"))
    readers, hashed = [], []
    inner_init, inner_sha = replace1.LibraryReader.__init__, store.hashlib.sha256

    def init(self, *args, **kwargs):
        inner_init(self, *args, **kwargs)
        readers.append(self)

    def sha256(data=b""):
        hashed.append(len(data))
        return inner_sha(data)

    monkeypatch.setattr(replace1.LibraryReader, "__init__", init)
    monkeypatch.setattr(store.hashlib, "sha256", sha256)
    counter = Counter(monkeypatch)
    assert main(["score", "--run-dir", str(run_dir), "--parent", str(tiny_parent_dir), *ARGS]) == 0
    trained = [v for v in space.variants() if not v.is_parent and not v.config.no_op]
    assert counter.calls == 3 * len(space)  # every variant on every batch ...
    assert [r.loads for r in readers] == [len(trained)]  # ... from one read of each file
    sizes = {r["bytes"] for r in store.read_manifest(run_dir)["variants"].values() if "bytes" in r}
    assert len([n for n in hashed if n in sizes]) == len(trained)  # and one hash of each


def test_a_single_batch_keeps_no_library_entry(run, tiny_parent_dir, monkeypatch):
    """One batch uses each entry once: nothing is kept in memory after its use (`KEEP_LIBRARY` is for reuse)."""
    run_dir, parent, space = run
    readers = []
    inner_init = replace1.LibraryReader.__init__

    def init(self, *args, **kwargs):
        inner_init(self, *args, **kwargs)
        readers.append(self)

    monkeypatch.setattr(replace1.LibraryReader, "__init__", init)
    one_batch = ["--search-space", "tiny", "--blocks", "2", "--batch-size", "2", "--chunk-tokens", "16"]
    assert main(["score", "--run-dir", str(run_dir), "--parent", str(tiny_parent_dir), *one_batch]) == 0
    trained = [v for v in space.variants() if not v.is_parent and not v.config.no_op]
    assert [r.loads for r in readers] == [len(trained)] and not readers[0].kept


def test_a_library_over_the_kept_bytes_is_read_again_but_not_hashed_again(run, monkeypatch):
    run_dir, parent, space = run
    trained = [v for v in space.variants() if not v.is_parent and not v.config.no_op]
    want = {key_of(v): variant_state(run_dir, parent, v).keys() for v in trained}
    reader = store.LibraryReader(run_dir, keep_bytes=0)
    hashed = []
    inner_sha = store.hashlib.sha256
    monkeypatch.setattr(store.hashlib, "sha256", lambda data=b"": hashed.append(1) or inner_sha(data))
    for _ in range(2):
        for v in trained:
            assert reader.state(v).keys() == want[key_of(v)]
    assert reader.loads == 2 * len(trained) and not reader.kept
    assert len(hashed) == len(trained)  # nothing else hashes in this loop
