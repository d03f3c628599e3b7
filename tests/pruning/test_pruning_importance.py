"""Minitron activation importance on tiny models: planted dead units rank last; layer scores are what
they claim to be; aggregation streams exactly; scores round-trip through the run directory."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_llama

from puzzle.errors import PuzzleError
from puzzle.model.checkpoint import to_puzzle
from puzzle.pruning.importance import (
    BatchAccumulator,
    aggregate_seq,
    calibration_sequences,
    compute_importance,
    load_importance,
    ranking,
    save_importance,
)
from puzzle.pruning.prune import PrunePlan, prune_model


def _batches(n=12, T=24, seed=0, vocab=320):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, T), generator=g)
    return [ids[i : i + 4] for i in range(0, n, 4)]


def _scores(model, **kw):
    return compute_importance(to_puzzle(model), _batches(), progress=False, **kw)


@torch.no_grad()
def test_dead_neuron_ranks_last():
    model = make_llama()
    model.model.layers[1].mlp.gate_proj.weight[37] = 0  # silu(0) = 0: nothing enters down_proj
    scores = _scores(model)
    neurons = scores["layers.1.neurons"]
    assert neurons[37] == 0
    assert ranking(neurons)[-1] == 37
    assert (neurons[torch.arange(128) != 37] > 0).all()


@torch.no_grad()
def test_dead_head_ranks_last():
    model = make_llama(num_key_value_heads=4)  # one KV head per query head, so one head can die alone
    d = model.config.head_dim
    model.model.layers[0].self_attn.v_proj.weight[2 * d : 3 * d] = 0
    heads = _scores(model)["layers.0.heads"]
    assert heads[2] == 0 and ranking(heads)[-1] == 2


@torch.no_grad()
def test_dead_kv_group_ranks_last():
    model = make_llama()  # 4 query heads, 2 KV groups
    d = model.config.head_dim
    model.model.layers[2].self_attn.v_proj.weight[0:d] = 0  # group 0 feeds query heads 0 and 1
    scores = _scores(model)
    assert scores["layers.2.kv_groups"][0] == 0 and ranking(scores["layers.2.kv_groups"])[-1] == 0
    assert set(ranking(scores["layers.2.heads"])[-2:].tolist()) == {0, 1}
    assert torch.allclose(scores["layers.2.kv_groups"][1], scores["layers.2.heads"][2:].sum())


@torch.no_grad()
def test_dead_channel_ranks_last():
    model = make_llama()
    c = 11
    model.model.embed_tokens.weight[:, c] = 0
    for layer in model.model.layers:  # nothing ever writes channel c into the residual stream
        layer.self_attn.o_proj.weight[c] = 0
        layer.mlp.down_proj.weight[c] = 0
    channels = _scores(model)["channels"]
    assert channels[c] == 0 and ranking(channels)[-1] == c
    assert (channels[torch.arange(64) != c] > 0).all()


@torch.no_grad()
def test_layer_scores_match_their_definitions():
    model = make_llama()
    puzzle_model = to_puzzle(model)
    batches = _batches()
    scores = compute_importance(puzzle_model, batches, block_sizes=(1, 2), progress=False)
    ids = torch.cat(batches)
    out = puzzle_model(ids, output_hidden_states=True)
    hs = out.hidden_states
    bi = torch.stack([1 - F.cosine_similarity(hs[i], hs[i + 1], dim=-1).mean() for i in range(4)])
    assert torch.allclose(scores["layers.block_importance"], bi, atol=1e-5)
    assert torch.allclose(scores["lm_loss"], model(ids, labels=ids).loss, atol=1e-4)
    # dropping layer i in the scores == the loss of a model that really lacks layer i (and of layers 1-2)
    for drop, key, idx in (((2,), "layers.drop_loss.k1", 2), ((1, 2), "layers.drop_loss.k2", 1)):
        pruned, _ = prune_model(puzzle_model, scores, PrunePlan(drop_layers=drop))
        assert torch.allclose(scores[key][idx], pruned(ids, labels=ids).loss, atol=1e-4)
    assert torch.equal(scores["layers.drop_loss"], scores["layers.drop_loss.k1"])
    assert scores["layers.drop_loss.k2"].shape == (3,) and (scores["layers.drop_kl.k1"] > 0).all()


def test_drop_batches_limits_the_drop_losses_only():
    model = to_puzzle(make_llama())
    full = compute_importance(model, _batches(), progress=False)
    one = compute_importance(model, _batches(), drop_batches=1, progress=False)
    assert torch.equal(full["layers.1.neurons"], one["layers.1.neurons"])
    assert not torch.allclose(full["layers.drop_loss"], one["layers.drop_loss"])


@pytest.mark.parametrize("how", ["mean", "l2", "var"])
def test_batch_aggregation_streams_exactly(how):
    x = torch.rand(10, 7)
    acc = BatchAccumulator(how)
    for part in x.split(3):
        acc.add(part)
    want = {"mean": x.mean(0), "l2": x.norm(dim=0), "var": x.var(0, unbiased=False)}[how]
    assert torch.allclose(acc.result(), want, atol=1e-6)


def test_seq_aggregation():
    x = torch.rand(2, 5, 3)
    assert torch.allclose(aggregate_seq(x, "mean"), x.mean(1))
    assert torch.allclose(aggregate_seq(x, "l2"), x.norm(dim=1))
    assert torch.allclose(aggregate_seq(x, "var"), x.var(1, unbiased=False))


def test_aggregation_choice_changes_scores_and_bad_choice_fails():
    model = to_puzzle(make_llama())
    a = compute_importance(model, _batches(), batch_agg="l2", seq_agg="mean", block_sizes=(), progress=False)
    b = compute_importance(model, _batches(), batch_agg="mean", seq_agg="l2", block_sizes=(), progress=False)
    assert not torch.allclose(a["layers.0.neurons"], b["layers.0.neurons"])
    with pytest.raises(PuzzleError, match="batch_agg"):
        compute_importance(model, _batches(), batch_agg="max", progress=False)
    with pytest.raises(PuzzleError, match="block sizes"):
        compute_importance(model, _batches(), block_sizes=(4,), progress=False)


def test_calibration_sequences_cut_blocks():
    blocks = torch.arange(4 * 16).reshape(4, 16).numpy()
    seqs = calibration_sequences(blocks, 5, 8)
    assert seqs.shape == (5, 8) and seqs[1, 0] == 8 and seqs[2, 0] == 16
    with pytest.raises(PuzzleError, match="longer"):
        calibration_sequences(blocks, 2, 32)
    with pytest.raises(PuzzleError, match="only 8"):
        calibration_sequences(blocks, 9, 8)


def test_scores_round_trip(tmp_path):
    scores = _scores(make_llama())
    with pytest.raises(PuzzleError, match="puzzle importance"):
        load_importance(tmp_path)
    save_importance(tmp_path, scores, {"batch_agg": "l2"})
    back = load_importance(tmp_path)
    assert back.keys() == scores.keys()
    assert all(torch.equal(back[k], scores[k]) for k in scores)


def test_bf16_importance_ranks_as_fp32_does():
    """--dtype bf16: the forward in bf16, every score summed in fp32 (float32 on the CPU, ready to save)."""
    from puzzle.device import place

    fp32 = _scores(make_llama(), block_sizes=(1,))
    bf16 = compute_importance(place(to_puzzle(make_llama()), "cpu", torch.bfloat16), _batches(), progress=False,
                              block_sizes=(1,))
    assert fp32.keys() == bf16.keys()
    for key, ref in fp32.items():
        got = bf16[key]
        assert got.dtype == ref.dtype and got.device.type == "cpu" and torch.isfinite(got).all(), key
        if ref.numel() > 1:  # rankings agree: bf16 moves scores by its rounding, not their order at large
            corr = torch.corrcoef(torch.stack([got.double(), ref.double()]))[0, 1]
            assert corr > 0.98, (key, corr)
