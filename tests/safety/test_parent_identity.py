"""Issue 22, items 2 and 3: a parent is identified by its content, not its path, and `puzzle run`'s ledger
never trusts itself over the files. Unit tests of the fingerprint rule (puzzle/model/fingerprint.py), then
what a user types: overwrite the parent's weights and rerun `puzzle run`; run `puzzle solve` by hand between
two `puzzle run`s."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

from puzzle.cli import main
from puzzle.model import fingerprint as fp
from puzzle.model.fingerprint import file_fingerprint, fingerprint, listing_fingerprint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the pipeline tests' tiny config
from test_pipeline import tiny_config  # noqa: E402


# ---- the fingerprint rule --------------------------------------------------------------------------------


@pytest.fixture
def small_limits(monkeypatch):
    """The large-file rule on small files: whole hashes up to 4 KiB, 64-byte windows, 8 per file."""
    monkeypatch.setattr(fp, "FULL_HASH_BYTES", 4096)
    monkeypatch.setattr(fp, "HEAD_BYTES", 1024)
    monkeypatch.setattr(fp, "WINDOW", 64)
    monkeypatch.setattr(fp, "MAX_WINDOWS", 8)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _weights(path: Path, seed: int = 0, n: int = 4096) -> Path:
    rng = np.random.default_rng(seed)
    save_file({"a.weight": rng.standard_normal(n).astype(np.float32),
               "b.weight": rng.standard_normal(n).astype(np.float32)}, str(path))
    return path


def _data_start(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_a_small_file_is_hashed_whole_and_a_copy_elsewhere_is_the_same_parent(tmp_path):
    path = _weights(tmp_path / "model.safetensors", n=64)  # 512 bytes a tensor: under FULL_HASH_BYTES
    before = fingerprint(path)
    copy = tmp_path / "elsewhere" / "model.safetensors"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    assert fingerprint(copy) == before  # content, not path
    for offset in (_data_start(path), path.stat().st_size // 2 + 3, path.stat().st_size - 1):
        _flip(path, offset)
        assert fingerprint(path) != before, offset
        _flip(path, offset)
        assert fingerprint(path) == before
    assert fingerprint(tmp_path / "missing") == "absent"


def test_a_large_safetensors_file_is_its_header_and_every_tensors_start_middle_and_end(tmp_path, small_limits):
    path = _weights(tmp_path / "model.safetensors")  # 16 KiB a tensor: the sampled rule
    before = fingerprint(path)
    data = _data_start(path)
    tensor = 4096 * 4
    # each tensor's first, middle and last bytes, and the header, are read ...
    for offset in (8 + 10, data, data + tensor // 2, data + tensor - 1, data + tensor, data + 2 * tensor - 1):
        _flip(path, offset)
        assert fingerprint(path) != before, offset
        _flip(path, offset)
    # ... and a byte no window covers is not: the reads are bounded, not the whole file
    _flip(path, data + tensor // 4)
    assert fingerprint(path) == before
    # another tensor of the same bytes count (a re-export, a fine-tune) is another parent
    assert fingerprint(_weights(path, seed=1)) != before


def test_a_gguf_or_other_large_file_is_its_head_and_evenly_spaced_windows(tmp_path, small_limits):
    path = tmp_path / "parent.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(64 * 1024))
    before = fingerprint(path)
    for offset in (0, 1000, path.stat().st_size - 1):  # in the head, and the last window
        _flip(path, offset)
        assert fingerprint(path) != before, offset
        _flip(path, offset)
    windows = fp._even(fp.HEAD_BYTES, path.stat().st_size)
    assert len(windows) == fp.MAX_WINDOWS and windows[-1] == (path.stat().st_size - fp.WINDOW, fp.WINDOW)
    untouched = next(o for o in range(fp.HEAD_BYTES, path.stat().st_size)
                     if not any(s <= o < s + n for s, n in windows))
    _flip(path, untouched)
    assert fingerprint(path) == before
    with open(path, "ab") as f:  # the size is part of it
        f.write(b"\0")
    assert fingerprint(path) != before


def test_a_model_directory_is_its_top_level_files(tmp_path):
    model = tmp_path / "child"
    model.mkdir()
    _weights(model / "model.safetensors", n=64)
    (model / "config.json").write_text(json.dumps({"hidden_size": 64}))
    before = fingerprint(model)
    (model / "gkd").mkdir()  # a child's GKD output is the next model, not this one
    _weights(model / "gkd" / "model.safetensors", seed=3, n=64)
    (model / ".lock").write_text("x")
    assert fingerprint(model) == before
    (model / "config.json").write_text(json.dumps({"hidden_size": 65}))
    assert fingerprint(model) != before
    # a single .safetensors parent takes its config from the directory: it is part of its identity
    single = fingerprint(model / "model.safetensors")
    (model / "config.json").write_text(json.dumps({"hidden_size": 66}))
    assert fingerprint(model / "model.safetensors") != single


def test_a_corpus_is_its_listing(tmp_path):
    """Every file below it by name, size and modification time: nothing of it is read."""
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "sub" / "a.txt").write_text("one")
    before = listing_fingerprint(corpus)
    (corpus / "sub" / "a.txt").write_text("two")  # the same size, written again
    assert listing_fingerprint(corpus) != before
    before = listing_fingerprint(corpus)
    (corpus / "sub" / "b.txt").write_text("more")
    assert listing_fingerprint(corpus) != before
    (corpus / ".cache").write_text("x")  # hidden files are not the corpus
    before = listing_fingerprint(corpus)
    (corpus / ".cache").write_text("xy")
    assert listing_fingerprint(corpus) == before


def test_an_overwrite_in_place_is_seen_within_one_process(tmp_path):
    """The in-process memo is keyed by the file's stat (size, mtime, ctime, inode): rewriting the same
    bytes count in place, as `save_pretrained` does, is a new fingerprint."""
    path = _weights(tmp_path / "model.safetensors", n=64)
    before = file_fingerprint(path)
    _flip(path, _data_start(path) + 5)
    assert file_fingerprint(path) != before


# ---- item 2: a parent overwritten in place ----------------------------------------------------------------


def _tiny_run(tmp_path, parent_dir, **changes) -> Path:
    raw = {**tiny_config(tmp_path, parent_dir), "convert_parent": True, **changes}
    raw = {k: v for k, v in raw.items() if v is not None}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config


def _step_lines(out: str) -> dict[str, str]:
    """'[i/n] NAME: complete, skipped' / '[i/n] NAME: done in ...' lines by step name."""
    lines = {}
    for line in out.splitlines():
        if line.startswith("[") and "] " in line and ": " in line:
            name, state = line.split("] ", 1)[1].split(": ", 1)
            lines[name] = state
    return lines


def _load(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_a_parent_overwritten_in_place_redoes_what_was_made_from_it(tiny_parent_dir, tmp_path, capsys):
    """A fine-tuned parent re-exported to the same path: `puzzle run` reconverts it, retrains the library,
    rescores, realises the child from the new weights, distills from the new teacher and evaluates against
    it (before: all 13 stages 'complete, skipped', a child mixing new parent weights with variants trained
    on the old ones)."""
    from conftest import make_llama

    config = _tiny_run(tmp_path, tiny_parent_dir, baselines=None)
    assert main(["run", str(config)]) == 0, capsys.readouterr().err
    run = tmp_path / "run"
    manifest = json.loads((run / "library" / "manifest.json").read_text())
    trained = {k: r["sha256"] for k, r in manifest["variants"].items() if r["source"] == "trained"}
    scores_before = json.loads((run / "scores" / "scores.json").read_text())["fingerprint"]
    capsys.readouterr()

    tuned = make_llama(seed=7)  # same shapes, other weights: a fine-tune exported over the old file
    tuned.save_pretrained(tiny_parent_dir, safe_serialization=True)
    assert main(["run", str(config)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    states = _step_lines(out)
    assert states["convert_parent"].startswith("done"), out
    assert not any(s.startswith("complete") for s in states.values()), out  # all made from the parent: redone

    new_embed = tuned.model.embed_tokens.weight.detach()
    assert np.allclose(_load(run / "parent" / "model.safetensors")["model.embed_tokens.weight"].float().numpy(),
                       new_embed.numpy())  # R/parent reconverted
    after = json.loads((run / "library" / "manifest.json").read_text())
    assert all(after["variants"][k]["sha256"] != sha for k, sha in trained.items())  # every variant retrained
    assert json.loads((run / "scores" / "scores.json").read_text())["fingerprint"] != scores_before
    info = json.loads((run / "parent.json").read_text())
    assert after["parent_fingerprint"] == info["parent_fingerprint"] == fingerprint(run / "parent")
    child = _load(run / "children" / "fast" / "model.safetensors")
    assert np.allclose(child["model.embed_tokens.weight"].float().numpy(), new_embed.numpy())
    sources = json.loads((run / "children" / "fast" / "gkd" / "sources.json").read_text())
    assert sources["teacher_fingerprint"] == fingerprint(run / "parent")
    assert json.loads((run / "eval" / "fast+gkd.json").read_text())["parent_fingerprint"] == fingerprint(run / "parent")

    capsys.readouterr()
    assert main(["run", str(config)]) == 0
    assert set(_step_lines(capsys.readouterr().out).values()) == {"complete, skipped"}  # and then stable


def test_a_stage_that_does_not_retrain_refuses_what_was_made_from_another_parent(tiny_parent_dir, tmp_path, capsys):
    """Every stage that reads an artefact made from the parent and does not remake it ends in one line naming
    the stage that does, once the parent changed under the run: score and realize (the library), solve (the
    scores), prune and build-library's FFN init (the importance scores). Before: each used what was made
    from the old weights."""
    from conftest import make_llama

    config = _tiny_run(tmp_path, tiny_parent_dir, convert_parent=False, gkd=None, baselines=None, evaluate=None)
    assert main(["run", str(config)]) == 0, capsys.readouterr().err
    run = tmp_path / "run"
    make_llama(seed=7).save_pretrained(tiny_parent_dir, safe_serialization=True)
    capsys.readouterr()
    refused = {
        "rerun puzzle build-library": [
            ["score", "--run-dir", str(run), "--blocks", "2", "--batch-size", "2"],
            ["realize", "--run-dir", str(run), "--solution", "fast", "--out", str(tmp_path / "child2")]],
        "rerun puzzle build-library and puzzle score": [
            ["solve", "--run-dir", str(run), "--budget", "h100_80gb", "--speedup", "1.2", "--name", "again"]],
        "rerun puzzle importance": [
            ["prune", str(tiny_parent_dir), str(tmp_path / "pruned"), "--run-dir", str(run), "--ffn-size", "64"],
            ["build-library", "--run-dir", str(run), "--tokens-per-block", "256", "--batch-size", "4", "--no-ray"]],
    }
    for message, commands in refused.items():
        for argv in commands:
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "child2").exists() and not (tmp_path / "pruned").exists()
    assert not (run / "solutions" / "again.json").exists()


# ---- item 3: the ledger against the files ------------------------------------------------------------------


def test_a_solve_run_by_hand_is_undone_by_puzzle_run(tiny_parent_dir, tmp_path, capsys):
    """`puzzle solve --name fast` by hand with another target between two `puzzle run`s: solve[fast] runs
    again (its file is not what it wrote) and so does everything after it, so the report's `fast` is the
    evaluated child's solution (before: realize/evaluate skipped, the report showed the hand-made solution
    beside the child of the config's)."""
    config = _tiny_run(tmp_path, tiny_parent_dir, convert_parent=False, importance=None, gkd=None,
                       baselines=None, evaluate={"val_blocks": 2, "batch_size": 2, "budget": "h100_80gb"})
    assert main(["run", str(config)]) == 0, capsys.readouterr().err
    run = tmp_path / "run"
    planned = json.loads((run / "solutions" / "fast.json").read_text())
    capsys.readouterr()

    assert main(["solve", "--run-dir", str(run), "--budget", "h100_80gb", "--speedup", "1.5", "--name", "fast"]) == 0
    by_hand = json.loads((run / "solutions" / "fast.json").read_text())
    assert by_hand["predicted"]["speedup"] != planned["predicted"]["speedup"]  # the hand-made solution differs
    capsys.readouterr()
    assert main(["run", str(config), "--check"]) == 0
    states = _step_lines(capsys.readouterr().out)
    first = list(states).index("solve[fast]")
    assert all(v == "complete" for v in list(states.values())[:first])
    assert all(v == "would run" for v in list(states.values())[first:]), states

    assert main(["run", str(config)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "solutions/fast.json is not what it wrote" in out, out
    solution = json.loads((run / "solutions" / "fast.json").read_text())
    evaluated = json.loads((run / "eval" / "fast.json").read_text())
    assert solution["predicted"]["speedup"] == pytest.approx(planned["predicted"]["speedup"])
    assert evaluated["predicted"]["speedup"] == pytest.approx(solution["predicted"]["speedup"], rel=1e-9)
    realized = json.loads((run / "children" / "fast" / "realized.json").read_text())
    assert realized["block_configs_sha256"] == __import__("hashlib").sha256(
        json.dumps(solution["block_configs"], sort_keys=True).encode()).hexdigest()
    capsys.readouterr()
    assert main(["run", str(config)]) == 0
    assert set(_step_lines(capsys.readouterr().out).values()) == {"complete, skipped"}


def test_an_output_removed_or_edited_by_hand_reruns_its_step_and_what_follows(tiny_parent_dir, tmp_path, capsys):
    """The rule for every step's files, not one example: a removed child reruns realize (before: skipped,
    evaluate then failed or reported a model that is gone), an edited costs table reruns profile."""
    config = _tiny_run(tmp_path, tiny_parent_dir, convert_parent=False, importance=None, gkd=None,
                       baselines=None, evaluate=None)
    assert main(["run", str(config)]) == 0, capsys.readouterr().err
    run = tmp_path / "run"
    shutil.rmtree(run / "children" / "fast")
    costs = run / "costs" / "h100_80gb.json"
    costs.write_text(costs.read_text() + "\n")
    capsys.readouterr()
    assert main(["run", str(config), "--check"]) == 0
    states = _step_lines(capsys.readouterr().out)
    first = list(states).index("profile[h100_80gb]")
    assert all(v == "complete" for v in list(states.values())[:first])
    assert all(v == "would run" for v in list(states.values())[first:]), states
    assert main(["run", str(config)]) == 0, capsys.readouterr().err
    assert (run / "children" / "fast" / "realized.json").exists()
    capsys.readouterr()
    assert main(["run", str(config)]) == 0
    assert set(_step_lines(capsys.readouterr().out).values()) == {"complete, skipped"}
