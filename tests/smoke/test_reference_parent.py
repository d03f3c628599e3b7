"""Smoke test on the real reference parent (SmolLM2-135M-Instruct GGUF); skipped when not fetched."""

import pytest
import torch

from puzzle.model.checkpoint import load_model, load_tokenizer, to_puzzle

from conftest import REFERENCE_GGUF, requires_reference

pytestmark = [pytest.mark.smoke, requires_reference]


def test_converted_parent_matches_transformers_llama_and_generates_with_cache():
    llama = load_model(REFERENCE_GGUF)
    tokenizer = load_tokenizer(REFERENCE_GGUF)
    child = to_puzzle(llama)
    batch = tokenizer(["The Python tutorial explains", "A dictionary maps keys"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = llama(**batch).logits
        got = child(**batch).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    prompt = tokenizer("The Python language is", return_tensors="pt")
    kwargs = dict(max_new_tokens=10, do_sample=False)
    with torch.no_grad():
        cached = child.generate(**prompt, use_cache=True, **kwargs)
        uncached = child.generate(**prompt, use_cache=False, **kwargs)
        reference = llama.generate(**prompt, use_cache=True, **kwargs)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, reference)
