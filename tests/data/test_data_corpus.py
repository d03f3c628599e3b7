"""Reading corpora: directories, .txt/.rst/.md, .jsonl, .parquet, and every bad input as one clear PuzzleError."""

import json

import pandas as pd
import pytest

from puzzle.data.corpus import Corpus, corpus_files, iter_documents
from puzzle.errors import PuzzleError


def _one_line_error(call, match: str) -> str:
    with pytest.raises(PuzzleError, match=match) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def _write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_directory_reads_every_text_like_file_sorted(tmp_path):
    root = tmp_path / "corpus"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a.txt").write_text("doc a")
    (root / "b" / "c.rst.txt").write_text("doc c")
    (root / "b" / "deep" / "d.md").write_text("doc d")
    (root / "b" / "e.rst").write_text("doc e")
    _write_jsonl(root / "f.jsonl", [{"text": "doc f1"}, {"text": "doc f2", "id": 7}])
    pd.DataFrame({"text": ["doc g1", "doc g2"], "n": [1, 2]}).to_parquet(root / "g.parquet")
    # not corpus text: other types, hidden files and folders
    (root / "script.py").write_text("print('no')")
    (root / ".hidden.txt").write_text("no")
    (root / ".git").mkdir()
    (root / ".git" / "notes.txt").write_text("no")

    files = corpus_files(root)
    assert [f.relative_to(root).as_posix() for f in files] == [
        "a.txt", "b/c.rst.txt", "b/deep/d.md", "b/e.rst", "f.jsonl", "g.parquet",
    ]  # fmt: skip
    docs = list(iter_documents(root))
    assert docs == ["doc a", "doc c", "doc d", "doc e", "doc f1", "doc f2", "doc g1", "doc g2"]


def test_corpus_is_reiterable_and_skips_blank_documents(tmp_path):
    (tmp_path / "one.txt").write_text("first")
    (tmp_path / "blank.txt").write_text("  \n\n")
    _write_jsonl(tmp_path / "lines.jsonl", [{"text": "x"}, {"text": "   "}, {"text": "y"}])
    (tmp_path / "lines.jsonl").write_text((tmp_path / "lines.jsonl").read_text() + "\n\n")  # trailing blank lines
    corpus = Corpus(tmp_path)
    assert list(corpus) == list(corpus) == ["x", "y", "first"]


def test_single_files_of_each_kind(tmp_path):
    txt = tmp_path / "book.txt"
    txt.write_text("\ufeffAll of it.\n\nOne document.")  # a byte-order mark is dropped
    assert list(iter_documents(txt)) == ["All of it.\n\nOne document."]

    jsonl = tmp_path / "docs.jsonl"
    _write_jsonl(jsonl, [{"text": "one"}, {"text": "two"}])
    assert list(iter_documents(jsonl)) == ["one", "two"]

    parquet = tmp_path / "docs.parquet"
    pd.DataFrame({"text": ["p1", None, "p2"]}).to_parquet(parquet)
    assert list(iter_documents(parquet)) == ["p1", "p2"]


def test_missing_path(tmp_path):
    _one_line_error(lambda: Corpus(tmp_path / "nowhere"), "corpus not found")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n")
    message = _one_line_error(lambda: Corpus(path), "unsupported corpus file type")
    assert ".jsonl" in message


def test_directory_without_text_files(tmp_path):
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    _one_line_error(lambda: Corpus(tmp_path), "holds no text files")


def test_empty_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.md").write_text("\n  \n")
    _one_line_error(lambda: list(Corpus(tmp_path)), "is empty")


def test_jsonl_line_without_text(tmp_path):
    path = tmp_path / "docs.jsonl"
    _write_jsonl(path, [{"text": "fine"}, {"body": "no text field"}])
    message = _one_line_error(lambda: list(iter_documents(path)), "no 'text' field")
    assert f"{path}:2" in message


def test_jsonl_bad_lines(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"text": \n')
    _one_line_error(lambda: list(iter_documents(path)), r"docs.jsonl:2: not valid JSON")
    _write_jsonl(path, [{"text": 3}])
    _one_line_error(lambda: list(iter_documents(path)), "is a int, not a string")
    _write_jsonl(path, [["text", "a list"]])
    _one_line_error(lambda: list(iter_documents(path)), "no 'text' field")


def test_parquet_without_text_column(tmp_path):
    path = tmp_path / "docs.parquet"
    pd.DataFrame({"body": ["a"], "id": [1]}).to_parquet(path)
    message = _one_line_error(lambda: list(iter_documents(path)), "no 'text' column")
    assert "body" in message
    pd.DataFrame({"text": [1, 2]}).to_parquet(path)
    _one_line_error(lambda: list(iter_documents(path)), "not strings")


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "docs.parquet"
    path.write_bytes(b"not parquet at all")
    _one_line_error(lambda: list(iter_documents(path)), "not a readable parquet file")


# --- encodings: UTF-8 (with or without BOM), UTF-16 by its BOM, Latin-1 text; binary and garbage skipped ---

PROSE = "Déjà vu: the café's naïve façade. " * 20


def _encoded_corpus(root):
    """One file per case; returns {name: expected text or None when it must be skipped}."""
    import random

    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    cases = {
        "a_utf8.txt": (PROSE.encode("utf-8"), PROSE),
        "b_utf8_bom.txt": (b"\xef\xbb\xbf" + PROSE.encode("utf-8"), PROSE),
        "c_utf16.txt": (PROSE.encode("utf-16"), PROSE),  # little endian with its BOM
        "d_utf16_be.md": (b"\xfe\xff" + PROSE.encode("utf-16-be"), PROSE),
        "e_latin1.txt": (PROSE.encode("latin-1"), PROSE),
        "f_random.txt": (bytes(rng.randrange(1, 256) for _ in range(4096)), None),  # no NUL: not "binary"
        "g_binary.rst": (b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 64 + b"text between nulls" * 8, None),
        "h_mostly_utf8.txt": (PROSE.encode("utf-8") + b"\xff", PROSE + "\ufffd"),  # one stray byte: kept
    }
    for name, (data, _) in cases.items():
        (root / name).write_bytes(data)
    return {name: text for name, (_, text) in cases.items()}


def test_encodings_are_detected_and_unreadable_files_skipped(tmp_path):
    expected = _encoded_corpus(tmp_path / "corpus")
    corpus = Corpus(tmp_path / "corpus")
    assert list(corpus) == [text for text in expected.values() if text is not None]
    assert sorted(p.name for p in corpus.skipped) == ["f_random.txt", "g_binary.rst"]
    assert "binary" in corpus.skipped[tmp_path / "corpus" / "g_binary.rst"]
    assert "undecodable" in corpus.skipped[tmp_path / "corpus" / "f_random.txt"]
    summary = corpus.summary()
    assert "\n" not in summary and "2 of 8" in summary and "f_random.txt" in summary


def test_a_jsonl_in_utf16_is_read(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in ["café", "naïve"]).encode("utf-16"))
    assert list(iter_documents(path)) == ["café", "naïve"]


def test_a_corpus_of_only_unreadable_files_says_why(tmp_path):
    (tmp_path / "x.txt").write_bytes(bytes(range(256)) * 8)
    message = _one_line_error(lambda: list(Corpus(tmp_path)), "skipped")
    assert "x.txt" in message


def test_mostly_ascii_latin1_is_read_as_latin1_and_utf8_with_a_stray_byte_as_utf8(tmp_path):
    english = "Plain English prose, line after line. " * 200
    (tmp_path / "a_latin1.txt").write_bytes((english + "Caf\xe9.").encode("latin-1"))  # one accent in 7.6 KB
    (tmp_path / "b_utf8.txt").write_bytes((english + "Café.").encode("utf-8") + b"\xe9")  # a stray byte
    corpus = Corpus(tmp_path)
    assert list(corpus) == [english + "Café.", english + "Café.\ufffd"]
    assert corpus.encodings == {tmp_path / "a_latin1.txt": "cp1252", tmp_path / "b_utf8.txt": "utf-8"}


# ---- bounded pieces (issue 22): no string handed on is longer than MAX_DOCUMENT_CHARS --------------------------

def _awkward_text(n: int, seed: int = 0) -> str:
    """Words, runs of mixed whitespace, CRLF line ends and long stretches without any whitespace."""
    import random

    rng = random.Random(seed)
    parts = []
    while sum(map(len, parts)) < n:
        parts.append(rng.choice(["word", "Straße", "x" * rng.randint(1, 300), "é"]))
        parts.append(rng.choice([" ", "  \t ", "\r\n", "\n\n", " \u3000 ", ""]))
    return "".join(parts)


def test_pieces_rejoin_to_the_text_and_each_ends_where_a_whitespace_run_starts():
    from puzzle.data.corpus import pieces

    text = _awkward_text(20_000)
    out = list(pieces(text, limit=500))
    assert "".join(out) == text and len(out) > 40
    assert all(len(p) <= 500 for p in out)
    for before, after in zip(out, out[1:]):
        # cut before a whitespace run, never inside one; or at the limit where the window had none
        assert (after[0].isspace() and not before[-1].isspace()) or len(before) == 500
    short = "a short document"
    assert list(pieces(short, limit=500)) == [short]


def test_a_text_file_is_read_in_blocks_into_the_same_pieces(tmp_path, monkeypatch):
    """Reading a file block by block cuts where `pieces` cuts the whole text (block boundaries anywhere, CRLF
    translated as read_text does)."""
    from puzzle.data import corpus

    text = _awkward_text(30_000, seed=1)
    path = tmp_path / "doc.txt"
    path.write_bytes(text.encode("utf-8"))
    monkeypatch.setattr(corpus, "MAX_DOCUMENT_CHARS", 700)
    monkeypatch.setattr(corpus, "_READ_CHARS", 97)
    expected = [p for p in corpus.pieces(path.read_text(encoding="utf-8"), limit=700) if p.strip()]
    assert list(Corpus(path)) == expected


def test_a_multi_megabyte_single_line_is_read_in_bounded_memory(tmp_path):
    """A 16 MB line (the 180 MB one that aborted prepare-data, scaled down): every document is at most
    MAX_DOCUMENT_CHARS, the pieces rejoin to the line, and reading holds a few pieces, not the file."""
    import hashlib
    import tracemalloc

    from puzzle.data.corpus import MAX_DOCUMENT_CHARS

    line = ("lorem ipsum dolor " * (16 * 2**20 // 18 + 1))[: 16 * 2**20]
    (tmp_path / "big.txt").write_text(line)
    tracemalloc.start()
    try:
        lengths, digest = [], hashlib.sha256()
        for doc in Corpus(tmp_path / "big.txt"):
            lengths.append(len(doc))
            digest.update(doc.encode())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert max(lengths) <= MAX_DOCUMENT_CHARS and sum(lengths) == len(line)
    assert digest.hexdigest() == hashlib.sha256(line.encode()).hexdigest()
    # 4 MB: the encoding sample (1 MiB, decoded) and a few pieces; reading the file whole takes 32 MB
    assert peak < 16 * MAX_DOCUMENT_CHARS, peak


def test_a_jsonl_document_longer_than_the_limit_becomes_pieces(tmp_path, monkeypatch):
    from puzzle.data import corpus

    monkeypatch.setattr(corpus, "MAX_DOCUMENT_CHARS", 100)
    text = " ".join(f"w{i}" for i in range(200))
    _write_jsonl(tmp_path / "c.jsonl", [{"text": text}, {"text": "short"}])
    docs = list(Corpus(tmp_path / "c.jsonl"))
    assert "".join(docs[:-1]) == text and docs[-1] == "short" and max(map(len, docs)) <= 100
