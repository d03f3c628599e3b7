"""The roofline's MoE FFN (roofline.py `moe_ops`): the experts a step touches, FLOPs from the active parameters,
per-expert dispatch, expert parallelism, measured routing frequencies (routing.py)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from puzzle.errors import PuzzleError
from puzzle.model import FFNConfig, MoEConfig, build_ffn
from puzzle.model.checkpoint import puzzle_config_from
from puzzle.profiling.hardware import Device, HardwareProfile, Workload, load_profile, parse_profile
from puzzle.profiling.roofline import (
    EXPERT_DISPATCH_KERNELS,
    NORM_KERNELS,
    ROUTER_KERNELS,
    ModelShape,
    gpu_params,
    op_time,
    parent_blocks,
    predict_model_costs,
    sublayer_costs,
    sublayer_ops,
)
from puzzle.profiling.routing import read_expert_frequencies
from puzzle.shape import expected_experts

from conftest import make_family_config

MOE = FFNConfig(moe=MoEConfig(num_experts=4, top_k=2, expert_size=8))  # D=4 below: an expert has 3*4*8 = 96 weights


def toy_profile(batch=2, input_len=3, overhead=0.0, expert_parallel=1, link=0.0):
    # 100 FLOP/s and 100 B/s, fully achievable: a time in seconds is max(flops, bytes) / 100 (+ link / its rate)
    device = Device("toy", "gpu", {"bf16": 100.0}, 100.0, 1e9, 1.0, 1.0, kernel_overhead_s=overhead,
                    interconnect_bandwidth=link)
    return HardwareProfile("toy", device, Workload(batch, input_len, 4, "bf16", expert_parallel=expert_parallel))


def toy_shape(**kw) -> ModelShape:
    return ModelShape(4, 2, num_key_value_heads=1, head_dim=2, intermediate_size=16, num_hidden_layers=1,
                      vocab_size=10, **kw)


def ops_of(config=MOE, phase="decode", **profile):
    hw = toy_profile(**profile)
    return {op.name: op for op in sublayer_ops(toy_shape(), "ffn", config, hw.workload, phase)}, hw


def test_expected_experts_by_hand():
    assert expected_experts(4, 2, 1) == pytest.approx(2.0)  # one token: exactly its k experts
    assert expected_experts(4, 2, 2) == pytest.approx(4 * (1 - 0.5**2))  # uniform: E (1 - (1 - k/E)^n)
    assert expected_experts(4, 2, 0) == 0.0
    # two experts take every token: only they are ever read, whatever the batch
    assert expected_experts(4, 2, 50, [1, 1, 0, 0]) == pytest.approx(2.0)
    # frequencies on any scale: shares summing to 1, to k (importance.py), or counts
    skew = [0.4, 0.3, 0.2, 0.1]
    values = {expected_experts(4, 2, 3, [f * s for f in skew]) for s in (1, 2, 1000)}
    assert max(values) - min(values) < 1e-12
    p = [2 * f for f in skew]
    assert expected_experts(4, 2, 3, skew) == pytest.approx(sum(1 - (1 - q) ** 3 for q in p))
    with pytest.raises(ValueError):
        expected_experts(4, 2, 3, [1.0, 1.0])


def test_expected_experts_match_the_experts_moeffn_runs():
    """The derivation against the model's own router: i.i.d. random tokens through a random MoEFFN router (whose
    experts are chosen unevenly); the mean number of distinct experts its forward runs per batch of n tokens is
    sum_j 1 - (1 - p_j)^n with p_j the measured fraction of tokens that chose j."""
    config = puzzle_config_from(make_family_config("qwen3_moe_norm"))
    torch.manual_seed(0)
    moe = build_ffn(config, FFNConfig(moe=MoEConfig(num_experts=8, top_k=2, expert_size=16))).eval()
    with torch.no_grad():
        moe.gate.weight *= torch.logspace(0, 1, 8)[:, None]  # logits of 1x to 10x the spread: uneven routing
    batches, n = 4000, 5
    with torch.inference_mode():
        _, chosen = moe.route(torch.randn(batches * n, config.hidden_size))
    picked = torch.zeros(batches * n, 8).scatter_(1, chosen, 1.0)  # (tokens, E) one-hot of each token's top-k
    frequency = picked.mean(0)  # sums to k
    assert frequency.max() > 4 * frequency.min()  # the test's premise: uneven routing
    distinct = (picked.view(batches, n, 8).amax(1)).sum(1).float().mean().item()  # what forward loops over
    assert distinct == pytest.approx(expected_experts(8, 2, n, frequency.tolist()), rel=0.01)
    assert distinct < expected_experts(8, 2, n)  # uneven routing touches fewer experts than uniform


def test_decode_reads_the_experts_a_batch_touches_and_computes_with_the_active_ones():
    # D=4, E=4 experts of I=8, top-2; decode of B=2 tokens, bf16 (e=2): U = 4 (1 - (1/2)^2) = 3 experts read
    ops, _ = ops_of(batch=2)
    rows, U = 2 * 2, 3.0
    gate_up, down = ops["experts_gate_up"], ops["experts_down"]
    assert gate_up.flops == 2 * rows * 4 * 16 and down.flops == 2 * rows * 8 * 4  # n*k rows through the SwiGLUs
    assert gate_up.bytes == 2 * (U * 4 * 16 + rows * 4 + rows * 16)  # U experts' gate+up weights, rows in and out
    assert down.bytes == 2 * (U * 8 * 4 + rows * 8 + rows * 4)
    assert (ops["router"].flops, ops["router"].bytes) == (2 * 2 * 4 * 4, 2 * (4 * 4 + 2 * 4 + 2 * 4))
    # a big batch reads every expert once, never more
    big, _ = ops_of(batch=1000)
    assert big["experts_down"].bytes - 2 * (1000 * 2) * (8 + 4) == pytest.approx(2 * 4 * 8 * 4)


def test_moe_flops_follow_the_active_parameters():
    """The matmul FLOPs of an MoE FFN prefill are ModelShape's (2 per multiply-add of the router and k experts
    per token): the roofline and the shape arithmetic agree."""
    shape = toy_shape()
    ops, hw = ops_of(phase="prefill", batch=2, input_len=3)
    matmuls = ("router", "experts_gate_up", "experts_down")
    assert sum(ops[k].flops for k in matmuls) == 2 * shape.prefill_flops(MOE, 3)
    assert shape.matmul_params(MOE) == 2 * 3 * 4 * 8 + 4 * 4  # k experts + the router


def test_each_chosen_expert_launches_its_dispatch_and_swiglu_ops():
    fast, slow = toy_profile(batch=2), toy_profile(batch=2, overhead=0.01)
    shape = toy_shape()
    extra = sublayer_costs(shape, "ffn", MOE, slow)["decode_s"] - sublayer_costs(shape, "ffn", MOE, fast)["decode_s"]
    U = 3.0  # as above
    kernels = NORM_KERNELS + ROUTER_KERNELS + U * (EXPERT_DISPATCH_KERNELS + 5) + 1  # + the residual add
    assert extra == pytest.approx(0.01 * kernels)


def test_a_shared_expert_runs_on_every_token():
    shared = FFNConfig(moe=MoEConfig(num_experts=4, top_k=2, expert_size=8, shared_expert_size=6))
    ops, _ = ops_of(shared, phase="prefill", batch=2, input_len=3)
    n = 6
    assert ops["shared_gate_up"].flops == 2 * n * 4 * 12 and ops["shared_down"].flops == 2 * n * 6 * 4
    matmuls = ("router", "experts_gate_up", "experts_down", "shared_gate_up", "shared_down")
    assert sum(ops[k].flops for k in matmuls) == 2 * toy_shape().prefill_flops(shared, 3)


def test_measured_frequencies_price_a_skewed_router_below_a_uniform_one():
    shape, hw = toy_shape(), toy_profile(batch=2)
    uniform = sublayer_costs(shape, "ffn", MOE, hw)
    skewed = sublayer_costs(shape, "ffn", MOE, hw, frequencies=[1.0, 1.0, 0.0, 0.0])
    assert skewed["decode_s"] < uniform["decode_s"]
    # measured on another expert set (an expert-pruned child): uniform
    assert sublayer_costs(shape, "ffn", MOE, hw, frequencies=[1.0, 1.0])["decode_s"] == uniform["decode_s"]
    # a whole model takes them per layer
    config = make_family_config("qwen3_moe_norm")
    blocks = parent_blocks(config)
    moe_layer = next(i for i, b in enumerate(blocks) if b.ffn.is_moe)
    E = blocks[moe_layer].ffn.moe.num_experts
    h100 = load_profile("h100_80gb").with_workload(batch_size=2)  # decode streams weights: memory-bound
    base = predict_model_costs(config, blocks, h100)
    hot = predict_model_costs(config, blocks, h100, {moe_layer: [1.0, 1.0] + [0.0] * (E - 2)})
    assert hot["decode_s"] < base["decode_s"] and hot["params"] == base["params"]


def test_expert_parallelism_splits_the_experts_and_pays_an_all_reduce():
    shape = toy_shape()
    one = toy_profile(batch=2)
    two = toy_profile(batch=2, expert_parallel=2, link=50.0)
    ops1 = {op.name: op for op in sublayer_ops(shape, "ffn", MOE, one.workload, "decode")}
    ops2 = {op.name: op for op in sublayer_ops(shape, "ffn", MOE, two.workload, "decode")}
    for name in ("experts_gate_up", "experts_silu_mul", "experts_down", "expert_dispatch"):
        assert ops2[name].flops == pytest.approx(ops1[name].flops / 2)
        assert ops2[name].kernels == pytest.approx(ops1[name].kernels / 2)
        # each GPU still writes the whole (n, D) output its experts add into
        full_output = 2 * 2 * 4 if name == "expert_dispatch" else 0
        assert ops2[name].bytes - full_output == pytest.approx((ops1[name].bytes - full_output) / 2)
    assert ops2["router"] == ops1["router"]  # replicated
    reduce = ops2["experts_all_reduce"]
    assert reduce.link_bytes == 2 * (2 - 1) / 2 * 2 * 4 * 2  # ring all-reduce of the (n, D) output
    assert op_time(reduce, two.device, "bf16") == pytest.approx(reduce.flops / 100 + reduce.link_bytes / 50.0)
    # one GPU holds half of the experts' weights; params stays the variant's
    costs = sublayer_costs(shape, "ffn", MOE, two)
    assert costs["params"] == shape.params(MOE)
    assert costs["param_bytes"] == 2 * (shape.params(MOE) - 2 * 96)
    assert gpu_params(shape, MOE, 3) == shape.params(MOE) - 2 * 96  # 4 experts on 3 GPUs: the fullest holds 2


def test_expert_parallel_profiles_parse_and_leave_other_fingerprints_alone():
    ep = load_profile("h100_80gb_x8_ep")
    assert ep.workload.expert_parallel == 8 and ep.device.interconnect_bandwidth == 450e9
    assert ep.to_dict()["workload"]["expert_parallel"] == 8
    plain = load_profile("h100_80gb").to_dict()  # the costs fingerprint of every existing profile is unchanged
    assert "expert_parallel" not in plain["workload"] and "interconnect_bandwidth" not in plain["device"]
    raw = {"device": {"name": "g", "peak_flops": {"bf16": 1e12}, "memory_bandwidth": 1e12, "memory_bytes": 1e9},
           "workload": {"batch_size": 1, "input_len": 1, "output_len": 1, "dtype": "bf16", "expert_parallel": 2}}
    with pytest.raises(PuzzleError, match="interconnect_bandwidth"):
        parse_profile(raw)
    raw["workload"]["expert_parallel"] = 0
    with pytest.raises(PuzzleError, match="expert_parallel"):
        parse_profile(raw)


def test_an_ep_profile_prices_qwen3_30b_a3b_decode_below_one_gpu():
    from puzzle.model.checkpoint import load_config
    from conftest import REPO

    config = load_config(REPO / "tests/data/configs/qwen3-30b-a3b")
    blocks = parent_blocks(config)
    one, eight = load_profile("h100_80gb"), load_profile("h100_80gb_x8_ep")
    a, b = predict_model_costs(config, blocks, one), predict_model_costs(config, blocks, eight)
    assert b["decode_s"] < a["decode_s"] and b["param_bytes"] < a["param_bytes"] / 4
    assert b["kv_cache_bytes"] == a["kv_cache_bytes"]  # attention replicated


# ---- measured routing frequencies ------------------------------------------------------------------------

def test_read_expert_frequencies_from_json_safetensors_and_a_run_dir(tmp_path):
    (tmp_path / "f.json").write_text(json.dumps({"0": [1, 2, 3], "2": [0.5, 0.5, 0]}))
    assert read_expert_frequencies(tmp_path / "f.json") == {0: (1.0, 2.0, 3.0), 2: (0.5, 0.5, 0.0)}
    (tmp_path / "g.json").write_text(json.dumps({"layers": {"1": [1, 1]}}))
    assert read_expert_frequencies(tmp_path / "g.json") == {1: (1.0, 1.0)}
    assert read_expert_frequencies({3: [2, 0]}) == {3: (2.0, 0.0)}
    assert read_expert_frequencies(None) == {}
    # the importance stage's scores (pruning/importance.py: layers.{i}.experts.frequency, summing to k)
    run = tmp_path / "run"
    (run / "importance").mkdir(parents=True)
    save_file({"layers.1.experts.frequency": torch.tensor([0.5, 1.0, 0.5]), "layers.1.experts.gate": torch.ones(3),
               "layers.0.neurons": torch.ones(4)}, run / "importance" / "importance.safetensors")
    assert read_expert_frequencies(run) == {1: (0.5, 1.0, 0.5)}
    assert read_expert_frequencies(run / "importance" / "importance.safetensors") == {1: (0.5, 1.0, 0.5)}


@pytest.mark.parametrize("content", ['{"x": [1]}', '{"0": [-1, 2]}', '{"0": [0, 0]}', '{"0": "abc"}', "[1, 2]",
                                     '{"0": [NaN]}', "not json"])
def test_malformed_frequencies_are_one_line(tmp_path, content):
    path = tmp_path / "f.json"
    path.write_text(content)
    with pytest.raises(PuzzleError):
        read_expert_frequencies(path)


def test_missing_frequencies_are_one_line(tmp_path):
    with pytest.raises(PuzzleError, match="not found"):
        read_expert_frequencies(tmp_path / "none.json")
    (tmp_path / "importance").mkdir()
    save_file({"layers.0.neurons": torch.ones(2)}, tmp_path / "importance" / "importance.safetensors")
    with pytest.raises(PuzzleError, match="experts.frequency"):
        read_expert_frequencies(tmp_path)
