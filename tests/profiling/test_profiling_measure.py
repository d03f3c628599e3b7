import pytest
import torch

from puzzle.model import AttentionConfig, FFNConfig
from puzzle.model.checkpoint import puzzle_config_from
from puzzle.profiling.hardware import Workload
from puzzle.profiling.measure import StaticKV, measure_fixed, measure_sublayer, sublayer_fn, time_call, torch_dtype
from puzzle.errors import PuzzleError

from conftest import make_llama_config

TINY = Workload(batch_size=1, input_len=8, output_len=4, dtype="fp32")
FAST = {"warmup": 1, "repeats": 3, "min_sample_s": 1e-4}


@pytest.fixture
def config():
    return puzzle_config_from(make_llama_config())


@pytest.mark.parametrize(
    "kind, variant",
    [
        ("attention", AttentionConfig(n_heads_in_group=2)),
        ("attention", AttentionConfig(n_heads_in_group=4)),
        ("attention", AttentionConfig(replace_with_linear=True)),
        ("ffn", FFNConfig(intermediate_size=64)),
        ("ffn", FFNConfig(replace_with_linear=True)),
    ],
)
def test_every_variant_that_runs_gets_positive_latencies(config, kind, variant):
    figures = measure_sublayer(config, kind, variant, TINY, torch.device("cpu"), **FAST)
    assert set(figures) == {"prefill_s", "decode_s"}
    assert all(0 < s < 1 for s in figures.values())


def test_no_ops_cost_nothing_and_are_not_run(config):
    assert sublayer_fn(config, "attention", AttentionConfig(no_op=True), TINY, "decode", torch.device("cpu"), torch.float32) is None
    assert measure_sublayer(config, "ffn", FFNConfig(no_op=True), TINY, **FAST) == {"prefill_s": 0.0, "decode_s": 0.0}


def test_fixed_parts_are_measured(config):
    for part in ("embeddings", "final_norm", "lm_head"):
        assert all(s > 0 for s in measure_fixed(config, part, TINY, **FAST).values())


def test_decode_attends_over_the_whole_static_cache(config):
    # the decode closure's attention sees decode_context keys: the new token's k/v land in the last slot
    fn = sublayer_fn(config, "attention", AttentionConfig(n_heads_in_group=2), TINY, "decode", torch.device("cpu"), torch.float32, cold_bytes=0)
    with torch.inference_mode():
        out = fn()
    assert out.shape == (1, 1, config.hidden_size)
    k = torch.zeros(1, 2, 5, 3)
    cache = StaticKV(k, torch.zeros_like(k), start=4)
    full_k, _ = cache.update(torch.ones(1, 2, 1, 3), torch.ones(1, 2, 1, 3), 0)
    assert full_k.shape[2] == 5 and full_k[:, :, 4].eq(1).all() and full_k[:, :, :4].eq(0).all()


def test_time_call_returns_the_median_per_call():
    calls = []
    seconds = time_call(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=5, min_sample_s=0.0)
    assert len(calls) == 2 + 1 + 5  # warm-up, the sizing call, one call per sample
    assert seconds > 0


def test_fp8_cannot_be_measured_eagerly():
    with pytest.raises(PuzzleError, match="--no-measure"):
        torch_dtype("fp8")


def test_copies_are_timed_in_turn_on_the_cpu_and_decode_is_eager_there():
    from puzzle.profiling.measure import decode_timing, sublayer_calls, time_calls

    assert decode_timing(torch.device("cpu")) == "eager" and decode_timing(torch.device("cuda")) == "cuda_graph"
    config = puzzle_config_from(make_llama_config())
    workload = Workload(batch_size=1, input_len=8, output_len=4, dtype="fp32")
    calls = sublayer_calls(config, "ffn", FFNConfig(intermediate_size=64), workload, "decode", torch.device("cpu"),
                           torch.float32, cold_bytes=1e5)
    assert len(calls) > 1  # copies enough to cover cold_bytes
    seen = []
    counted = [lambda i=i: seen.append(i) for i in range(len(calls))]
    assert time_calls(counted, torch.device("cpu"), "decode", warmup=0, repeats=len(calls), min_sample_s=0) > 0
    assert sorted(set(seen)) == list(range(len(calls)))  # every copy ran, in turn
    assert sublayer_calls(config, "ffn", FFNConfig(no_op=True), workload, "decode", torch.device("cpu"), torch.float32) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_cuda_graph_replays_the_decode_step():
    from puzzle.profiling.measure import cuda_graph

    x = torch.randn(4, 64, device="cuda")
    w = torch.randn(64, 64, device="cuda")
    out = torch.empty(4, 64, device="cuda")
    replay = cuda_graph(lambda: torch.matmul(x, w, out=out))
    x.copy_(torch.randn_like(x))
    replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, x @ w)


def test_a_decode_step_runs_every_sublayer_the_child_has():
    from puzzle.model import BlockConfig
    from puzzle.profiling.measure import decode_step_calls, measure_decode_step

    parent = puzzle_config_from(make_llama_config())
    workload = Workload(batch_size=1, input_len=8, output_len=4, dtype="fp32")
    calls = decode_step_calls(parent, workload, torch.device("cpu"), torch.float32)
    assert len(calls) == 3 + 2 * parent.num_hidden_layers  # embeddings, final norm, LM head + two per layer
    child = puzzle_config_from(make_llama_config())
    blocks = list(child.blocks)
    blocks[1] = BlockConfig(AttentionConfig(no_op=True), FFNConfig(no_op=True))
    child.block_configs = [b.to_dict(child.hidden_size) for b in blocks]
    assert len(decode_step_calls(child, workload, torch.device("cpu"), torch.float32)) == len(calls) - 2
    assert measure_decode_step(child, workload, torch.device("cpu"), warmup=1, repeats=2) > 0
