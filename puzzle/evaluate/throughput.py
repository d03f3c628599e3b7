"""Measured throughput on this machine: prefill tokens/s and decode tokens/s with the KV cache."""

import statistics
import time
from typing import Any

import torch


@torch.no_grad()
def measure_throughput(model: Any, vocab_size: int, batch: int = 4, prompt_len: int = 128, new_tokens: int = 32,
                       repeats: int = 3, seed: int = 0) -> dict[str, float]:
    """Medians over `repeats` after one warm-up. Decode = greedy generation of `new_tokens` after the
    prompt with the KV cache, prefill time subtracted."""
    g = torch.Generator().manual_seed(seed)
    device = model.lm_head.weight.device
    ids = torch.randint(3, vocab_size, (batch, prompt_len), generator=g).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # CUDA runs asynchronously
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=0, eos_token_id=None)
    prefill, total = [], []
    for r in range(repeats + 1):
        sync()
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        sync()
        t1 = time.perf_counter()
        model.generate(ids, **kwargs)
        sync()
        t2 = time.perf_counter()
        if r:  # the first round is the warm-up
            prefill.append(t1 - t0)
            total.append(t2 - t1)
    p, g_total = statistics.median(prefill), statistics.median(total)
    decode = max(g_total - p, 1e-9)
    return {
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "threads": torch.get_num_threads(),
        "prefill_s": p, "prefill_tokens_per_s": batch * prompt_len / p,
        "decode_s": decode, "decode_tokens_per_s": batch * new_tokens / decode,
    }
