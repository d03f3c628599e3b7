"""Serving a child in an inference engine on this machine: the same greedy tokens and prompt log-probs from
vLLM, llama.cpp and transformers, and the engine's tokens/s.

  drivers.py      one function per engine: greedy tokens, prompt log-probs, timed generations (vLLM runs in
                  its own environment's Python, through vllm_runner.py)
  vllm_runner.py  the script that environment runs: the standard library and vllm only, never `puzzle`
  commands.py     `puzzle serve-check CHILD --engine ...`: loads, agreement with transformers, tokens/s
"""
