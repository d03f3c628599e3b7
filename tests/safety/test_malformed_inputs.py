"""Malformed inputs as a user hands them to the CLI (issue 22, items 5 and 8): bounded work on a huge line or a
lying header, and a missing checksum or a non-finite number refused in one line (exit 2), never trusted."""

import json
import shutil

import numpy as np
import pytest
import yaml
from conftest import SAMPLE_TEXT

from puzzle.cli import main
from puzzle.data import corpus as corpus_module
from puzzle.data import prepare as prepare_module
from puzzle.io import atomic_write_json, write_table
from puzzle.solver.problem import Workload
from puzzle.solver.synthetic import synthetic_tables


def _cli(capsys, *argv):
    capsys.readouterr()  # what set-up printed
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _one_line(code, err):
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def _corpus(root, files):
    root.mkdir()
    for name, text in files.items():
        (root / name).write_text(text)
    return root


# ---- item 5: a multi-megabyte single line reaches the tokenizer in bounded pieces -----------------------

class _RecordingTokenizer:
    """The parent's tokenizer, recording the size of every string and every call handed to it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.strings: list[int] = []
        self.calls: list[int] = []

    def __call__(self, texts, **kwargs):
        self.strings += [len(t) for t in texts]
        self.calls.append(sum(len(t) for t in texts))
        return self.tokenizer(texts, **kwargs)

    def __len__(self):
        return len(self.tokenizer)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_single_line_of_megabytes_is_tokenised_in_bounded_pieces_and_stops_at_max_tokens(
        tiny_parent_dir, tmp_path, capsys, monkeypatch):
    """The 180 MB single-line .txt that aborted prepare-data (one 1.3 GB tokenizer allocation), scaled to 2 MB:
    no string handed to the tokenizer is longer than MAX_DOCUMENT_CHARS, no call holds more than a chunk, and
    with --max-tokens the tokenizer sees a fraction of the line, not all of it."""
    from puzzle.model import checkpoint

    words = np.random.default_rng(0).choice(["alpha", "beta", "gamma", "delta", "x" * 40], size=400_000)
    line = " ".join(words)
    assert len(line) > 2_000_000 and "\n" not in line
    corpus = _corpus(tmp_path / "corpus", {"huge.txt": line, **{f"d{i}.txt": t for i, t in enumerate(SAMPLE_TEXT)}})
    seen = {}

    def recording(path):
        seen["tokenizer"] = _RecordingTokenizer(load(path))
        return seen["tokenizer"]

    load = checkpoint.load_tokenizer
    monkeypatch.setattr(checkpoint, "load_tokenizer", recording)
    code, err = _cli(capsys, "prepare-data", corpus, tiny_parent_dir, "--run-dir", tmp_path / "run",
                     "--seq-len", 32, "--max-tokens", 2048)
    assert code == 0, err
    tokenizer = seen["tokenizer"]
    assert max(tokenizer.strings) <= corpus_module.MAX_DOCUMENT_CHARS
    assert max(tokenizer.calls) <= prepare_module._CHUNK_CHARS + corpus_module.MAX_DOCUMENT_CHARS
    assert sum(tokenizer.calls) < len(line) / 2  # stopped at --max-tokens
    meta = json.loads((tmp_path / "run" / "data" / "meta.json").read_text())
    assert meta["tokens"] <= 2048 and meta["n_documents"] > len(SAMPLE_TEXT) + 1  # the line became pieces


# ---- item 5: a GGUF or config.json whose dimensions disagree with its tensors ------------------------------

def _gguf(path, **header):
    """A complete tiny llama GGUF (2 layers, hidden 16, 2 heads of 8, 1 KV head, FFN 32, vocab 8) whose header
    fields can be set to lie about its tensors."""
    gguf = pytest.importorskip("gguf")
    dims = {"block_count": 2, "embedding_length": 16, "feed_forward_length": 32, "head_count": 2, "head_count_kv": 1,
            "vocab_size": 8, **header}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(dims["block_count"])
    w.add_context_length(64)
    w.add_embedding_length(dims["embedding_length"])
    w.add_feed_forward_length(dims["feed_forward_length"])
    w.add_head_count(dims["head_count"])
    w.add_head_count_kv(dims["head_count_kv"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(dims["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(8)])
    hidden, ffn, kv = 16, 32, 8
    w.add_tensor("token_embd.weight", np.zeros((8, hidden), dtype=np.float32))
    for i in range(2):
        for name, shape in [("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)),
                            ("ffn_down", (hidden, ffn)), ("attn_norm", (hidden,)), ("ffn_norm", (hidden,))]:
            w.add_tensor(f"blk.{i}.{name}.weight", np.zeros(shape, dtype=np.float32))
    w.add_tensor("output_norm.weight", np.zeros((hidden,), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _check_config(tmp_path, parent, **changes):
    config = tmp_path / "check.yaml"
    corpus = _corpus(tmp_path / "corpus", {f"d{i}.txt": t for i, t in enumerate(SAMPLE_TEXT)})
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "parent": str(parent), "corpus": str(corpus),
                                      "search_space": "tiny", **changes}))
    return config


def test_a_consistent_gguf_header_passes(tmp_path, capsys):
    code, err = _cli(capsys, "run", _check_config(tmp_path, _gguf(tmp_path / "p.gguf")), "--check")
    assert code == 0, err


@pytest.mark.parametrize("field, value", [
    ("block_count", 10**6),  # passed --check after 64 s, then hung build-library
    ("embedding_length", 10**9 + 1),  # not a multiple of the heads: transformers' ValueError traceback
    ("embedding_length", 10**9),
    ("head_count", 4),
    ("head_count", 0),
    ("head_count_kv", 2),
    ("feed_forward_length", 10**9),
    ("vocab_size", 10**9),
])
def test_a_gguf_header_that_disagrees_with_its_tensors_is_one_line_exit_2(tmp_path, capsys, field, value):
    parent = _gguf(tmp_path / "p.gguf", **{field: value})
    err = _one_line(*_cli(capsys, "run", _check_config(tmp_path, parent), "--check"))
    assert str(parent) in err and field in err
    err = _one_line(*_cli(capsys, "convert", parent, tmp_path / "out"))
    assert field in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value", [
    ("num_hidden_layers", 10**6),
    ("num_hidden_layers", 3),
    ("hidden_size", 10**9 + 1),
    ("num_attention_heads", 8),
    ("num_attention_heads", -1),
    ("num_key_value_heads", 1),
    ("intermediate_size", 10**9),
    ("vocab_size", 10**9),
    ("head_dim", 32),
])
@pytest.mark.parametrize("source", ["directory", "safetensors"])
def test_a_config_json_that_disagrees_with_its_tensors_is_one_line_exit_2(tiny_parent_dir, tmp_path, capsys, field,
                                                                          value, source):
    parent = tmp_path / "edited"
    shutil.copytree(tiny_parent_dir, parent)
    config = json.loads((parent / "config.json").read_text())
    (parent / "config.json").write_text(json.dumps({**config, field: value}))
    given = parent if source == "directory" else parent / "model.safetensors"
    err = _one_line(*_cli(capsys, "run", _check_config(tmp_path, given), "--check"))
    assert field in err and "config.json" in err


# ---- item 8: a missing checksum record is damage, not an old table --------------------------------------

@pytest.fixture
def solve_run(tmp_path, monkeypatch):
    """A run directory with scores and costs tables (and their sidecars) that `puzzle solve` reads."""
    monkeypatch.chdir(tmp_path)
    scores, costs, meta = synthetic_tables(num_layers=4, attention_variants=3, ffn_variants=3, seed=1,
                                           workload=Workload(8, 256, 64))
    run = tmp_path / "run"
    write_table(scores, run / "scores" / "scores", rebuild=f"puzzle score --run-dir {run}")
    write_table(costs, run / "costs" / "toy_gpu", rebuild=f"puzzle profile --run-dir {run} --budget toy_gpu")
    atomic_write_json(run / "costs" / "toy_gpu.json", {**meta, "profile": "toy_gpu", "constraints": {"speedup": 1.5}})
    return run


@pytest.mark.parametrize("table, rebuild", [("scores/scores.parquet", "puzzle score"),
                                            ("costs/toy_gpu.parquet", "puzzle profile")])
def test_a_table_whose_checksum_sidecar_was_deleted_is_refused(solve_run, capsys, table, rebuild):
    assert _cli(capsys, "solve", "--run-dir", solve_run, "--budget", "toy_gpu")[0] == 0
    path = solve_run / table
    (path.parent / f"{path.name}.sha256").unlink()
    err = _one_line(*_cli(capsys, "solve", "--run-dir", solve_run, "--budget", "toy_gpu"))
    assert str(path) in err and "sha256" in err and f"{rebuild} --run-dir {solve_run}" in err


# ---- item 8: every number finite (and positive where it is a size or a budget) -------------------------------

@pytest.mark.parametrize("field, value", [
    (("device", "memory_bandwidth"), ".inf"),  # was accepted: 316M tok/s
    (("device", "peak_flops", "fp32"), ".inf"),
    (("device", "memory_bytes"), ".nan"),
    (("device", "kernel_overhead_s"), ".nan"),
    (("device", "efficiency", "compute"), ".nan"),
    (("device", "threads"), ".inf"),
    (("workload", "batch_size"), ".inf"),
    (("constraints", "memory_gib"), ".inf"),
    (("device", "memory_bandwidth"), "-1.0e+12"),
])
def test_a_hardware_profile_with_a_non_finite_or_negative_number_is_one_line_exit_2(
        tiny_parent_dir, tiny_cpu_profile, tmp_path, capsys, field, value):
    raw = yaml.safe_load(tiny_cpu_profile.read_text())
    raw["device"]["efficiency"] = {"compute": 0.5, "memory": 0.5}
    *parents, key = field
    node = raw
    for name in parents:
        node = node.setdefault(name, {})
    node[key] = "VALUE"
    profile = tmp_path / "bad.yaml"
    profile.write_text(yaml.safe_dump(raw).replace("VALUE", value).replace("'", ""))
    err = _one_line(*_cli(capsys, "profile", "--parent", tiny_parent_dir, "--run-dir", tmp_path / "run",
                          "--budget", profile))
    assert key in err and ("finite" in err if "n" in value else "positive" in err)


@pytest.mark.parametrize("argv, message", [
    (["solve", "--speedup", "inf"], "--speedup must be a finite number, got inf"),
    (["solve", "--memory-gib", "nan"], "--memory-gib must be a finite number, got nan"),
    (["solve", "--speedup", "-2"], "--speedup must be a positive number, got -2.0"),
    (["solve", "--max-params", "1e999"], "not a finite count"),
    (["build-library", "--lr", "inf"], "--lr must be a finite number, got inf"),
    (["build-library", "--worker-memory-gib", "nan"], "--worker-memory-gib must be a finite number"),
    (["distill", "--temperature", "-1"], "--temperature must be a positive number"),
    (["prepare-data", "CORPUS", "PARENT", "--val-fraction", "nan"], "--val-fraction must be a finite number"),
])
def test_non_finite_or_negative_numbers_on_the_command_line_are_one_line_exit_2(solve_run, capsys, argv, message):
    extra = ["--run-dir", str(solve_run)] if argv[0] in ("solve", "build-library") else []
    extra += ["--budget", "toy_gpu"] if argv[0] == "solve" else []
    err = _one_line(*_cli(capsys, *argv, *extra))
    assert message in err, err


@pytest.mark.parametrize("section", [{"solve": [{"budget": "h100_80gb", "speedup": float("inf"), "name": "x"}]},
                                     {"build_library": {"lr": float("nan")}}])
def test_run_check_refuses_non_finite_numbers(tiny_parent_dir, tmp_path, capsys, section):
    err = _one_line(*_cli(capsys, "run", _check_config(tmp_path, tiny_parent_dir, **section), "--check"))
    assert "must be a finite number" in err
