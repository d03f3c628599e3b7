"""prepare-data: separators at document boundaries, a seeded document-level split, a resumable cache,
and reading the blocks back; plus a smoke test on the real tokenizer and corpus."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import REFERENCE_CORPUS, REFERENCE_GGUF, SAMPLE_TEXT, requires_reference

from puzzle.cli import main
from puzzle.data import prepare as prepare_module
from puzzle.data.blocks import iterate_batches, load_blocks, load_held_out_documents, load_meta
from puzzle.data.corpus import Corpus, iter_documents
from puzzle.data.prepare import prepare_blocks, prepare_data, split_documents
from puzzle.errors import PuzzleError

SEQ_LEN = 16


def make_documents(n: int = 20) -> list[str]:
    """Distinct documents of varying length (tens to hundreds of tokens with the tiny tokenizer)."""
    return [f"Document {i}. " + " ".join(SAMPLE_TEXT[j % 5] for j in range(i, i + 1 + i % 4)) for i in range(n)]


def expected_stream(tokenizer, documents, mask) -> list[int]:
    stream = []
    for doc, chosen in zip(documents, mask):
        if chosen:
            stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return stream


class Tracked:
    """A tokenizer that counts its calls and can fail on the n-th (a crash in the middle of a run)."""

    def __init__(self, inner, fail_on_call: int | None = None) -> None:
        self.inner, self.fail_on_call, self.calls = inner, fail_on_call, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash")
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "run"


def test_blocks_are_documents_with_separators_split_by_document(tiny_tokenizer, run_dir):
    docs = make_documents()
    prepare_blocks(docs, tiny_tokenizer, run_dir / "data", seq_len=SEQ_LEN, val_fraction=0.2, seed=3)
    meta = load_meta(run_dir)
    is_val = split_documents(len(docs), 0.2, seed=3)
    assert is_val.sum() == 4
    for split, mask in (("train", ~is_val), ("val", is_val)):
        blocks = load_blocks(run_dir, split)
        assert blocks.shape == (meta[f"n_{split}_blocks"], SEQ_LEN) and blocks.dtype == np.uint32
        stream = expected_stream(tiny_tokenizer, docs, mask)
        # whole documents in corpus order, each followed by eos, ragged tail dropped
        assert len(stream) // SEQ_LEN == len(blocks) > 0
        assert blocks.reshape(-1).tolist() == stream[: len(blocks) * SEQ_LEN]
        assert meta[f"n_{split}_documents"] == mask.sum()
    assert meta["separator_id"] == tiny_tokenizer.eos_token_id == 2
    assert meta["n_documents"] == 20 and meta["seq_len"] == SEQ_LEN and meta["seed"] == 3
    assert meta["tokens"] == (meta["n_train_blocks"] + meta["n_val_blocks"]) * SEQ_LEN
    assert not load_blocks(run_dir, "train").flags.writeable
    # the held-out documents' text is recorded, in corpus order
    assert load_held_out_documents(run_dir) == [d for d, v in zip(docs, is_val) if v]
    # nothing but the four artefacts is left behind
    assert sorted(p.name for p in (run_dir / "data").iterdir()) == ["meta.json", "train.bin", "val.bin",
                                                                   "val_documents.jsonl"]


def test_held_out_documents_are_checked_against_meta_and_rebuilt_when_missing(tiny_tokenizer, run_dir):
    docs = make_documents()
    prepare_blocks(docs, tiny_tokenizer, run_dir / "data", seq_len=SEQ_LEN, val_fraction=0.2, seed=3,
                   max_tokens=4 * SEQ_LEN)
    held_out = run_dir / "data" / "val_documents.jsonl"
    # all held-out documents, also those past the --max-tokens cap
    assert load_held_out_documents(run_dir) == [d for d, v in zip(docs, split_documents(20, 0.2, 3)) if v]
    good = held_out.read_bytes()
    held_out.write_bytes(good.replace(b"Document", b"Tampered"))
    with pytest.raises(PuzzleError, match="does not match its meta.json"):
        load_held_out_documents(run_dir)
    held_out.unlink()
    with pytest.raises(PuzzleError, match="rerun `puzzle prepare-data`"):
        load_held_out_documents(run_dir)
    # a rerun with the same settings sees the data incomplete and writes it again
    prepare_blocks(docs, tiny_tokenizer, run_dir / "data", seq_len=SEQ_LEN, val_fraction=0.2, seed=3,
                   max_tokens=4 * SEQ_LEN)
    assert held_out.read_bytes() == good


def test_split_is_deterministic_by_seed(tiny_tokenizer, tmp_path):
    docs = make_documents()
    bins = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        prepare_blocks(docs, tiny_tokenizer, tmp_path / name / "data", seq_len=SEQ_LEN, val_fraction=0.2, seed=seed)
        bins[name] = [(tmp_path / name / "data" / f"{s}.bin").read_bytes() for s in ("train", "val")]
    assert bins["a"] == bins["b"]
    assert bins["a"] != bins["c"]
    assert not np.array_equal(split_documents(20, 0.2, 0), split_documents(20, 0.2, 1))


def test_validation_gets_at_least_one_document_and_train_keeps_one():
    assert split_documents(2, 0.01, seed=0).sum() == 1
    assert split_documents(50, 0.001, seed=5).sum() == 1
    assert split_documents(3, 0.99, seed=0).sum() == 2
    assert split_documents(100, 0.1, seed=0).sum() == 10


def test_rerun_does_no_work_and_changes_rebuild(tiny_tokenizer, run_dir):
    docs = make_documents()
    out = prepare_blocks(docs, tiny_tokenizer, run_dir / "data", seq_len=SEQ_LEN, val_fraction=0.2)
    train = out / "train.bin"
    before = (train.stat().st_mtime_ns, (out / "meta.json").stat().st_mtime_ns)

    tracked = Tracked(tiny_tokenizer)
    assert prepare_blocks(docs, tracked, out, seq_len=SEQ_LEN, val_fraction=0.2) == out
    assert tracked.calls == 0
    assert (train.stat().st_mtime_ns, (out / "meta.json").stat().st_mtime_ns) == before

    # a generator is accepted too (materialised for the two passes) and is still a cache hit
    prepare_blocks(iter(docs), tracked, out, seq_len=SEQ_LEN, val_fraction=0.2)
    assert tracked.calls == 0

    prepare_blocks(docs, tracked, out, seq_len=8, val_fraction=0.2)  # settings changed
    assert tracked.calls > 0
    assert load_blocks(run_dir, "train").shape[1] == 8 and load_meta(run_dir)["seq_len"] == 8

    calls = tracked.calls
    prepare_blocks(docs[:-1] + [docs[-1] + " edited"], tracked, out, seq_len=8, val_fraction=0.2)  # corpus changed
    assert tracked.calls > calls


def test_crash_leaves_no_valid_looking_meta(tiny_tokenizer, run_dir, monkeypatch):
    monkeypatch.setattr(prepare_module, "_CHUNK_DOCS", 2)
    docs = make_documents()
    out = run_dir / "data"
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_blocks(docs, Tracked(tiny_tokenizer, fail_on_call=3), out, seq_len=SEQ_LEN, val_fraction=0.2)
    assert list(out.iterdir()) == []  # no meta, no bins, no temp files
    with pytest.raises(PuzzleError, match="puzzle prepare-data"):
        load_blocks(run_dir, "train")

    # a finished build, then a crashed rebuild with new settings: the old pair stays intact and consistent
    prepare_blocks(docs, tiny_tokenizer, out, seq_len=SEQ_LEN, val_fraction=0.2)
    old = load_blocks(run_dir, "train").copy()
    with pytest.raises(RuntimeError):
        prepare_blocks(docs, Tracked(tiny_tokenizer, fail_on_call=3), out, seq_len=8, val_fraction=0.2)
    assert np.array_equal(load_blocks(run_dir, "train"), old)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin", "val_documents.jsonl"]
    tracked = Tracked(tiny_tokenizer)
    prepare_blocks(docs, tracked, out, seq_len=8, val_fraction=0.2)
    assert tracked.calls > 0 and load_meta(run_dir)["seq_len"] == 8


def test_max_tokens_caps_the_total(tiny_tokenizer, run_dir):
    docs = make_documents(40)
    prepare_blocks(docs, tiny_tokenizer, run_dir / "data", seq_len=SEQ_LEN, val_fraction=0.1, max_tokens=200)
    meta = load_meta(run_dir)
    assert meta["tokens"] <= 200
    assert meta["n_val_blocks"] >= 1 and meta["n_train_blocks"] >= 1
    # the capped train stream is still a prefix of the full one
    stream = expected_stream(tiny_tokenizer, docs, ~split_documents(40, 0.1, 0))
    train = load_blocks(run_dir, "train").reshape(-1).tolist()
    assert train == stream[: len(train)]


@pytest.mark.parametrize(
    ("docs", "kwargs", "match"),
    [
        ([], {}, "corpus is empty"),
        (["only one document " * 50], {}, "only 1 document"),
        (make_documents(), {"val_fraction": 0.0}, "--val-fraction"),
        (make_documents(), {"val_fraction": 1.0}, "--val-fraction"),
        (make_documents(), {"seq_len": 1}, "--seq-len"),
        (make_documents(), {"max_tokens": 20}, "--max-tokens 20"),
        (make_documents(), {"seq_len": 4096}, "fewer than one block"),
    ],
)
def test_bad_inputs_raise_one_clear_line(tiny_tokenizer, run_dir, docs, kwargs, match):
    settings = {"seq_len": SEQ_LEN, "val_fraction": 0.2, **kwargs}
    with pytest.raises(PuzzleError, match=match) as info:
        prepare_blocks(docs, tiny_tokenizer, run_dir / "data", **settings)
    assert "\n" not in str(info.value)
    assert not (run_dir / "data" / "meta.json").exists()


def test_prepare_data_from_a_parent_directory(tmp_path, tiny_parent_dir, tiny_tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = make_documents(6)
    for i, doc in enumerate(docs):
        (corpus / f"doc{i}.txt").write_text(doc)
    run_dir = tmp_path / "run"
    out = prepare_data(corpus, tiny_parent_dir, run_dir=run_dir, seq_len=SEQ_LEN, val_fraction=0.3, seed=1)
    assert out == run_dir / "data"
    meta = load_meta(run_dir)
    assert meta["corpus"] == str(corpus.resolve()) and meta["n_documents"] == 6
    assert load_blocks(run_dir, "train").reshape(-1).tolist() == expected_stream(
        tiny_tokenizer, list(iter_documents(corpus)), ~split_documents(6, 0.3, 1)
    )[: meta["n_train_blocks"] * SEQ_LEN]


def test_prepare_data_says_and_records_which_files_it_skipped(tmp_path, tiny_parent_dir, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(make_documents(6)):
        (corpus / f"doc{i}.txt").write_text(doc)
    (corpus / "doc6.txt").write_bytes(make_documents(7)[6].encode("utf-16"))
    (corpus / "blob.txt").write_bytes(bytes(range(1, 256)) * 16)
    run_dir = tmp_path / "run"
    prepare_data(corpus, tiny_parent_dir, run_dir=run_dir, seq_len=SEQ_LEN, val_fraction=0.3, seed=1)
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if "skipped" in line]
    assert "1 of 8" in line and "blob.txt" in line and "utf-16" in line
    meta = load_meta(run_dir)
    assert meta["n_documents"] == 7
    assert meta["corpus_files"]["skipped"] == {str(corpus / "blob.txt"): Corpus(corpus).skipped[corpus / "blob.txt"]}
    assert meta["corpus_files"]["encodings"] == {"utf-16": 1, "utf-8": 6}


def test_prepare_data_bad_corpus_paths(tmp_path, tiny_parent_dir):
    with pytest.raises(PuzzleError, match="corpus not found"):
        prepare_data(tmp_path / "missing", tiny_parent_dir, run_dir=tmp_path / "run")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(PuzzleError, match="is empty"):
        prepare_data(tmp_path / "empty", tiny_parent_dir, run_dir=tmp_path / "run")


def test_cli_reports_a_missing_corpus_in_one_line(tmp_path, tiny_parent_dir, capsys):
    code = main(["prepare-data", str(tmp_path / "missing"), str(tiny_parent_dir), "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("puzzle: error: corpus not found") and err.count("\n") == 1


def test_load_blocks_errors(tiny_tokenizer, run_dir):
    with pytest.raises(PuzzleError, match=r"no prepared data; run `puzzle prepare-data CORPUS PARENT --run-dir"):
        load_blocks(run_dir, "val")
    prepare_blocks(make_documents(), tiny_tokenizer, run_dir / "data", seq_len=SEQ_LEN, val_fraction=0.2)
    with pytest.raises(PuzzleError, match="unknown split"):
        load_blocks(run_dir, "test")
    with open(run_dir / "data" / "val.bin", "r+b") as f:
        f.truncate(4)
    with pytest.raises(PuzzleError, match="does not match its meta.json"):
        load_blocks(run_dir, "val")


def test_iterate_batches():
    blocks = np.arange(10 * 4, dtype=np.uint32).reshape(10, 4)
    plain = list(iterate_batches(blocks, 4, shuffle=False, seed=0))
    assert [b.shape for b in plain] == [(4, 4), (4, 4), (2, 4)]
    assert all(b.dtype == torch.int64 for b in plain)
    assert torch.equal(torch.cat(plain), torch.from_numpy(blocks.astype(np.int64)))

    shuffled = torch.cat(list(iterate_batches(blocks, 3, shuffle=True, seed=7)))
    again = torch.cat(list(iterate_batches(blocks, 3, shuffle=True, seed=7)))
    other = torch.cat(list(iterate_batches(blocks, 3, shuffle=True, seed=8)))
    assert torch.equal(shuffled, again) and not torch.equal(shuffled, other)
    assert sorted(shuffled[:, 0].tolist()) == blocks[:, 0].tolist()  # a permutation of whole blocks

    limited = list(iterate_batches(blocks, 4, shuffle=True, seed=7, limit=6))
    assert [len(b) for b in limited] == [4, 2]
    assert torch.equal(torch.cat(limited), shuffled[:6])  # the limit does not change the order
    with pytest.raises(PuzzleError, match="batch size"):
        iterate_batches(blocks, 0, shuffle=False, seed=0)
    with pytest.raises(PuzzleError, match="limit"):
        iterate_batches(blocks, 2, shuffle=False, seed=0, limit=0)


@pytest.mark.smoke
@requires_reference
@pytest.mark.slow
def test_smoke_reference_corpus_and_tokenizer(tmp_path):
    from puzzle.model.checkpoint import load_tokenizer

    run_dir = tmp_path / "run"
    out = prepare_data(REFERENCE_CORPUS, REFERENCE_GGUF, run_dir=run_dir, seq_len=256, max_tokens=50_000)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["n_documents"] == 497
    assert 40_000 <= meta["tokens"] <= 50_000 and meta["n_val_blocks"] >= 1
    tokenizer = load_tokenizer(REFERENCE_GGUF)
    eos = tokenizer.eos_token_id
    assert meta["separator_id"] == eos and meta["vocab_size"] == 49152
    train, val = load_blocks(run_dir, "train"), load_blocks(run_dir, "val")
    assert train.shape == (meta["n_train_blocks"], 256) and val.shape == (meta["n_val_blocks"], 256)
    assert int(train.max()) < 49152

    # the train stream opens with the first train document and its separator follows it exactly
    docs = iter_documents(REFERENCE_CORPUS)
    is_val = split_documents(497, 0.05, seed=0)
    first = next(doc for doc, v in zip(docs, is_val) if not v)
    ids = tokenizer(first, add_special_tokens=False)["input_ids"]
    stream = train.reshape(-1)
    if len(ids) < len(stream):
        assert stream[len(ids)] == eos
    n = min(len(ids), len(stream))
    assert stream[:n].tolist() == ids[:n]
    assert (stream == eos).sum() >= 1

    # a rerun (same corpus, tokenizer and settings) tokenises nothing and rewrites nothing
    mtime = (out / "train.bin").stat().st_mtime_ns
    tracked = Tracked(tokenizer)
    prepare_blocks(Corpus(REFERENCE_CORPUS), tracked, out, seq_len=256, max_tokens=50_000)
    assert tracked.calls == 0 and (out / "train.bin").stat().st_mtime_ns == mtime


def _write_data(run_dir, train, val):
    data = run_dir / "data"
    data.mkdir(parents=True)
    np.asarray(train, dtype=np.uint32).tofile(data / "train.bin")
    np.asarray(val, dtype=np.uint32).tofile(data / "val.bin")
    meta = {"dtype": "uint32", "seq_len": train.shape[1], "n_train_blocks": len(train), "n_val_blocks": len(val)}
    (data / "meta.json").write_text(json.dumps(meta))


def test_token_ids_outside_the_vocabulary_are_one_line_exit_2(tmp_path, tiny_parent_dir, capsys):
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(tiny_parent_dir).vocab_size
    rng = np.random.default_rng(0)
    train = rng.integers(3, vocab, (8, SEQ_LEN))
    train[5, 7] = vocab + 41  # data prepared with another, larger tokenizer
    run_dir = tmp_path / "run"
    _write_data(run_dir, train, rng.integers(3, vocab, (2, SEQ_LEN)))
    argv = ["importance", str(tiny_parent_dir), "--run-dir", str(run_dir), "--n-samples", "8",
            "--drop-samples", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "train.bin" in err and str(vocab + 41) in err and str(vocab) in err
