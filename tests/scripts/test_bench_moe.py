"""scripts/bench_moe.py's upcycling: a dense Llama's FFNs split into transformers' own Mixtral experts reproduce
the dense model exactly when every expert is chosen with equal weights (down_proj x E), and the clusters are
an equal-size partition of the FFN's neurons."""

import sys
from pathlib import Path

import torch

from conftest import make_llama

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import bench_moe  # noqa: E402


def test_upcycled_mixtral_with_every_expert_is_the_dense_model():
    dense = make_llama(tie_word_embeddings=True)
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    xs = bench_moe.capture_ffn_inputs(dense, [ids])
    clusters = []
    for layer, x in zip(dense.model.layers, xs):
        act = torch.nn.functional.silu(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x)
        clusters.append(bench_moe.balanced_kmeans(act.detach().abs().T, 4))
    for idx in clusters:  # a partition of the 128 neurons into 4 x 32
        assert [len(i) for i in idx] == [32] * 4
        assert sorted(torch.cat(idx).tolist()) == list(range(128))
    moe = bench_moe.build_mixtral(dense, clusters, top_k=4, scale=4, routers=None)
    assert type(moe).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
        # top-2 of 4 with the same experts is another model (half of each FFN dropped)
        half = bench_moe.build_mixtral(dense, clusters, top_k=2, scale=2, routers=None)
        assert not torch.allclose(half(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-3)
