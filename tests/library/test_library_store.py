"""The library store: files written whole and listed with their hash, nothing half-written ever accepted,
`variant_state` giving what `replace_sublayer` needs for every kind of variant."""

import multiprocessing
import os

import pytest
import torch
from conftest import make_llama

from puzzle.errors import PuzzleError
from puzzle.library import store
from puzzle.model.checkpoint import to_puzzle
from puzzle.model.blocks import FFNConfig
from puzzle.model.surgery import replace_sublayer, sublayer_state
from puzzle.search_space import load_search_space


@pytest.fixture
def parent():
    return to_puzzle(make_llama(num_hidden_layers=2))


def record(layer, kind, name, **extra):
    return {"layer": layer, "kind": kind, "variant": name, "init": "test", "tokens": 0, "loss_init": 1.0, "loss_final": 0.5, **extra}


def ffn64_state(parent):
    state = sublayer_state(parent, 1, "ffn")
    return {
        "post_attention_layernorm.weight": state["post_attention_layernorm.weight"],
        "mlp.gate_proj.weight": state["mlp.gate_proj.weight"][:64],
        "mlp.up_proj.weight": state["mlp.up_proj.weight"][:64],
        "mlp.down_proj.weight": state["mlp.down_proj.weight"][:, :64],
    }


def test_variant_state_for_parent_noop_and_trained_variants(tmp_path, parent):
    space = load_search_space("tiny", parent.config)
    run = tmp_path / "run"
    state = ffn64_state(parent)
    rec = store.write_variant(run, record(1, "ffn", "ffn_64"), state)
    assert rec["source"] == "trained" and rec["file"] == "L001/ffn/ffn_64.safetensors"
    assert (run / "library" / rec["file"]).stat().st_size == rec["bytes"]

    pruned = space.variant(1, "ffn", "ffn_64")
    loaded = store.variant_state(run, parent, pruned)
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    own = store.variant_state(run, parent, space.variant(1, "ffn", "ffn_128"))
    assert all(torch.equal(own[k], v) for k, v in sublayer_state(parent, 1, "ffn").items())
    assert store.variant_state(run, parent, space.variant(1, "attention", "attn_noop")) == {}

    # what variant_state returns is exactly what replace_sublayer takes
    replace_sublayer(parent, 1, "ffn", FFNConfig(intermediate_size=64), loaded)
    assert parent.model.layers[1].mlp.down_proj.weight.shape == (64, 64)

    with pytest.raises(PuzzleError, match="run puzzle build-library"):
        store.variant_state(run, parent, space.variant(1, "ffn", "ffn_linear"))


def test_a_damaged_or_unlisted_file_is_never_accepted(tmp_path, parent):
    run = tmp_path / "run"
    store.write_variant(run, record(1, "ffn", "ffn_64"), ffn64_state(parent))
    space = load_search_space("tiny", parent.config)
    v = space.variant(1, "ffn", "ffn_64")
    assert store.missing_variants(run, [v]) == []

    path = store.variant_path(run, 1, "ffn", "ffn_64")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated, as a crash mid-write without rename would leave it
    assert store.missing_variants(run, [v]) == [v]
    with pytest.raises(PuzzleError, match="manifest hash"):
        store.load_variant(run, 1, "ffn", "ffn_64")

    flipped = bytearray(data)
    flipped[-1] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(flipped))
    assert store.missing_variants(run, [v]) == [v]

    # a whole, valid file the manifest does not list (its record never got written) is not a variant either
    store.write_variant(run, record(1, "ffn", "ffn_linear"), {"mlp.linear_mlp.weight": torch.zeros(64, 64)})
    store.update_manifest(run, drop=["L001/ffn/ffn_linear"])
    assert store.variant_path(run, 1, "ffn", "ffn_linear").exists()
    assert store.missing_variants(run, [space.variant(1, "ffn", "ffn_linear")]) != []


def test_a_record_without_its_hash_is_never_accepted(tmp_path, parent):
    """A trained entry whose sha256 was removed from the manifest verifies nothing: missing for build-library,
    one line when read (was a KeyError traceback)."""
    run = tmp_path / "run"
    store.write_variant(run, record(1, "ffn", "ffn_64"), ffn64_state(parent))
    manifest = store.read_manifest(run)
    entry = dict(manifest["variants"]["L001/ffn/ffn_64"])
    del entry["sha256"]
    store.update_manifest(run, [entry])
    v = load_search_space("tiny", parent.config).variant(1, "ffn", "ffn_64")
    assert store.missing_variants(run, [v]) == [v]
    with pytest.raises(PuzzleError, match="manifest hash"):
        store.load_variant(run, 1, "ffn", "ffn_64")


def test_untrained_records_have_no_file(tmp_path):
    run = tmp_path / "run"
    store.record_untrained(run, [record(0, "ffn", "ffn_128", source="parent"), record(0, "ffn", "ffn_noop", source="noop")])
    manifest = store.read_manifest(run)
    assert set(manifest["variants"]) == {"L000/ffn/ffn_128", "L000/ffn/ffn_noop"}
    assert not (run / "library" / "L000").exists()
    with pytest.raises(ValueError):
        store.record_untrained(run, [record(0, "ffn", "ffn_64", source="trained")])


def _writer(run, layer):
    for i in range(10):
        store.update_manifest(run, [record(layer, "ffn", f"ffn_{i}", source="noop")])


def test_concurrent_writers_lose_no_record(tmp_path):
    """Ray workers of different layer groups update one manifest; the lock keeps every record."""
    run = tmp_path / "run"
    ctx = multiprocessing.get_context("fork")  # fast; the writers touch no torch op
    procs = [ctx.Process(target=_writer, args=(run, layer)) for layer in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert len(store.read_manifest(run)["variants"]) == 40
    assert not [f for f in os.listdir(run / "library") if f.endswith(".tmp")]


def test_a_foreign_manifest_is_refused(tmp_path):
    path = store.manifest_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text('{"something": "else"}')
    with pytest.raises(PuzzleError, match="not a block library manifest"):
        store.read_manifest(tmp_path)
