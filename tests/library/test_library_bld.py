"""Decoupled BLD on a tiny parent: every trained variant ends below its loss at initialisation, the parent's
own variant has zero loss and is not trained, and one parent forward per batch feeds every variant."""

import numpy as np
import pytest
import torch
from conftest import make_llama

from puzzle.library import store
from puzzle.library.bld import BLDSettings, _take, build_layer_group, parent_activations
from puzzle.model.checkpoint import to_puzzle
from puzzle.model.surgery import replace_sublayer
from puzzle.search_space import build_search_space, load_search_space

SETTINGS = BLDSettings(tokens_per_block=6144, batch_size=4, calibration_tokens=512, eval_tokens=256, lr=2e-3)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: a second thread only adds synchronisation, which a busy shared machine makes costly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.integers(3, 320, size=(64, 32)), rng.integers(3, 320, size=(8, 32))


@pytest.fixture
def parent():
    torch.manual_seed(0)
    return to_puzzle(make_llama(num_hidden_layers=3))


def test_bld_lowers_every_trained_variant_and_leaves_the_parent_alone(tmp_path, parent, data):
    space = load_search_space("tiny", parent.config)
    summary = build_layer_group(tmp_path, parent, space, [0, 1, 2], *data, SETTINGS)
    records = store.read_manifest(tmp_path)["variants"]
    assert len(records) == len(space)

    trained = [r for r in records.values() if r["source"] == "trained"]
    assert {(r["kind"], r["variant"]) for r in trained} == {
        ("attention", "attn_g4"), ("attention", "attn_linear"), ("ffn", "ffn_64"), ("ffn", "ffn_linear")
    }
    assert len(trained) == summary["trained"] == 8  # 4 per layer, layer 0 keeps the parent's blocks only
    for r in trained:
        assert r["loss_final"] < r["loss_init"], r
        assert r["tokens"] >= SETTINGS.tokens_per_block and r["steps"] == 48
        assert (tmp_path / "library" / r["file"]).is_file()
    assert {r["init"] for r in trained} == {"kv_mean_pool", "wo_wv", "channel_contribution", "lstsq"}
    # the linear FFN's BLD loss is least squares, solved exactly; every other variant takes AdamW steps
    assert {r["variant"] for r in trained if r["trainer"] == "lstsq"} == {"ffn_linear"}

    for r in records.values():
        if r["source"] == "parent":
            assert r["loss_init"] == r["loss_final"] == 0.0 and r["tokens"] == 0 and "file" not in r
        if r["source"] == "noop":
            assert r["loss_init"] > 0.1 and r["tokens"] == 0 and "file" not in r
    noop_ffn = records["L001/ffn/ffn_noop"]
    assert noop_ffn["loss_init"] == pytest.approx(1.0)  # removing the FFN loses all it adds, by definition
    files = sorted(p.relative_to(tmp_path) for p in (tmp_path / "library").rglob("*.safetensors"))
    assert len(files) == 8


def test_a_stored_variant_placed_in_the_model_reproduces_its_recorded_loss(tmp_path, parent, data):
    space = load_search_space("tiny", parent.config)
    build_layer_group(tmp_path, parent, space, [1], *data, SETTINGS)
    variant = space.variant(1, "ffn", "ffn_64")
    record = store.read_manifest(tmp_path)["variants"]["L001/ffn/ffn_64"]

    ids = torch.cat(_take(data[1], SETTINGS.eval_tokens, SETTINGS.batch_size, SETTINGS.seed + 1))
    acts = parent_activations(parent, ids, [1]).layers[1]
    child = to_puzzle(make_llama(num_hidden_layers=3))
    replace_sublayer(child, 1, "ffn", variant.config, store.variant_state(tmp_path, parent, variant))
    with torch.no_grad():
        out = child(ids, output_hidden_states=True).hidden_states[2]  # after layer 1
    loss = ((out - acts.o).pow(2).sum() / (acts.o - acts.a).pow(2).sum()).item()
    assert loss == pytest.approx(record["loss_final"], rel=1e-4)
    assert loss < record["loss_init"]


@pytest.mark.slow
def test_one_parent_forward_per_batch_feeds_every_variant(tmp_path, parent, data):
    """The parent runs as often with 2 trained variants per layer as with 4: never once per variant."""
    calls = []
    parent.model.embed_tokens.register_forward_hook(lambda *args: calls.append(1))
    few = build_search_space({"attention": {"kv_heads": "all"}, "ffn": {"ratios": [1.0, 0.5], "linear": True}}, parent.config)
    many = load_search_space("tiny", parent.config)
    counts = []
    for i, space in enumerate((few, many)):
        calls.clear()
        summary = build_layer_group(tmp_path / str(i), parent, space, [1, 2], *data, SETTINGS)
        counts.append((len(calls), summary["trained"]))
    assert counts[0][1] == 4 and counts[1][1] == 8
    eval_batches, calib_batches = 256 // 32 // 4, 512 // 32 // 4
    assert counts[0][0] == counts[1][0] == 48 + eval_batches + calib_batches


def test_a_rerun_trains_nothing_and_changes_no_file(tmp_path, parent, data):
    space = load_search_space("tiny", parent.config)
    build_layer_group(tmp_path, parent, space, [2], *data, SETTINGS)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "library").rglob("*.safetensors")}
    manifest = store.read_manifest(tmp_path)
    summary = build_layer_group(tmp_path, parent, space, [2], *data, SETTINGS)
    assert summary["trained"] == 0 and summary["skipped"] == 8
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "library").rglob("*.safetensors")} == before
    assert store.read_manifest(tmp_path) == manifest


def test_minitron_neuron_scores_rank_the_ffn_neurons_when_the_run_has_them(tmp_path, parent, data):
    from dataclasses import replace

    from puzzle.library.ray_jobs import load_neuron_importance
    from puzzle.pruning.importance import save_importance

    assert load_neuron_importance(tmp_path) is None  # no `puzzle importance` yet: Channel Contribution
    save_importance(tmp_path, {"layers.1.neurons": torch.arange(128.0), "channels": torch.ones(64)}, {})
    scores = load_neuron_importance(tmp_path)
    assert list(scores) == [1] and torch.equal(scores[1], torch.arange(128.0))
    space = load_search_space("tiny", parent.config)
    quick = replace(SETTINGS, tokens_per_block=256)
    build_layer_group(tmp_path / "auto", parent, space, [1], *data, quick, scores)
    build_layer_group(tmp_path / "cc", parent, space, [1], *data, replace(quick, ffn_init="channel_contribution"), scores)
    assert store.read_manifest(tmp_path / "auto")["variants"]["L001/ffn/ffn_64"]["init"] == "minitron"
    assert store.read_manifest(tmp_path / "cc")["variants"]["L001/ffn/ffn_64"]["init"] == "channel_contribution"


def test_bf16_autocast_bld_lowers_every_trained_variant(tmp_path, parent, data):
    """--dtype bf16 on the CPU: the parent held in bf16, each variant trained under autocast with fp32
    weights and fp32 AdamW state; every variant still ends below its loss at initialisation."""
    settings = BLDSettings(tokens_per_block=3072, batch_size=4, calibration_tokens=512, eval_tokens=256, lr=2e-3,
                           dtype="bf16")
    space = load_search_space("tiny", parent.config)
    summary = build_layer_group(tmp_path, parent, space, [1, 2], *data, settings)
    assert {p.dtype for p in parent.parameters()} == {torch.bfloat16}  # the frozen parent, held once in bf16
    assert parent.model.rotary_emb.inv_freq.dtype == torch.float32
    trained = [r for r in store.read_manifest(tmp_path)["variants"].values() if r["source"] == "trained"]
    assert len(trained) == summary["trained"] == 8
    for r in trained:
        assert r["loss_final"] < r["loss_init"], r
    state = store.load_variant(tmp_path, 1, "ffn", "ffn_64")
    assert {t.dtype for t in state.values()} == {torch.float32}  # the trained (master) weights
    # a bf16 library is not an fp32 one: the digest tells them apart, an fp32 library keeps its old digest
    assert settings.digest(tmp_path) != SETTINGS.digest(tmp_path)
    fp32 = BLDSettings(**{**settings.to_dict(), "dtype": "fp32"})
    assert fp32.digest(tmp_path) == BLDSettings(**{**fp32.to_dict(), "device": "cuda:0"}).digest(tmp_path)


def test_bld_trains_a_window_variant_from_the_parents_attention_copied(tmp_path, parent, data):
    """A window variant starts as the parent's attention, weights copied (only the mask differs), so its loss
    at initialisation is the window's alone; BLD lowers it, and the stored entry masks with the window."""
    space = build_search_space({"attention": {"kv_heads": "all", "windows": [8]}}, parent.config)  # seq 32 > 8
    assert [a.name for a in space.attention_variants(1)] == ["attn_g2", "attn_g2_w8"]
    build_layer_group(tmp_path, parent, space, [1], *data, SETTINGS)
    records = store.read_manifest(tmp_path)["variants"]
    windowed = records["L001/attention/attn_g2_w8"]
    assert windowed["source"] == "trained" and windowed["init"] == "copy"
    assert 0 < windowed["loss_final"] < windowed["loss_init"]
    assert records["L001/attention/attn_g2"]["source"] == "parent"
    state = store.variant_state(tmp_path, parent, space.variant(1, "attention", "attn_g2_w8"))
    replace_sublayer(parent, 1, "attention", space.variant(1, "attention", "attn_g2_w8").config, state)
    assert parent.model.layers[1].self_attn.window == 8 and parent.config.blocks[1].attention.name == "attn_g2_w8"
@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_bld_trains_moe_variants_and_records_their_experts(tmp_path, data, family):
    """MoE variants (issue 25) of a layer: each kept expert set in its record, every trained one lowered from
    its init (router and experts trained against the parent layer's output); the dense layer of Qwen2-MoE
    takes the dense variants."""
    from conftest import make_family_parent

    torch.manual_seed(0)
    parent = to_puzzle(make_family_parent(family))
    raw = {"attention": {}, "ffn": {"ratios": [0.5], "moe": {"expert_ratios": [0.5], "top_k": [1, 2],
                                                            "expert_width_ratios": [0.5]}}}
    space = build_search_space(raw, parent.config)
    layers = [1, 3] if family == "qwen2_moe" else [1]  # qwen2_moe's layer 3 is dense
    settings = BLDSettings(tokens_per_block=2048, batch_size=4, calibration_tokens=256, eval_tokens=256, lr=2e-3)
    build_layer_group(tmp_path, parent, space, layers, *data, settings)
    records = store.read_manifest(tmp_path)["variants"]
    own = space.parent_ffns[1].moe
    trained = {r["variant"]: r for r in records.values() if r["source"] == "trained" and r["kind"] == "ffn"}
    half = own.num_experts // 2
    shared = "" if own.shared_expert_size is None else f"_s{own.shared_expert_size}"
    assert {f"moe_e{half}k{k}_i{own.expert_size // 2}{shared}" for k in (1, 2)} <= set(trained)
    for name, r in trained.items():
        assert r["loss_final"] < r["loss_init"], r
        if name.startswith("moe_"):
            assert len(r["experts"]) == half and r["experts"] == sorted(r["experts"])
            assert r["init"] == "experts_by_router_norm+channel_contribution"
    assert records["L001/ffn/" + own.name]["experts"] == list(range(own.num_experts))  # the parent's own
    if family == "qwen2_moe":
        assert "L003/ffn/ffn_64" in records and "experts" not in records["L003/ffn/ffn_64"]
