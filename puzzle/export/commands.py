"""`puzzle export`: a child, or a parent as an all-parent child, in a format an inference engine loads."""

from pathlib import Path
from typing import Literal


from puzzle import dtypes
from puzzle.engines import check_child, check_family, get_engine, violations
from puzzle.errors import PuzzleError
from puzzle.model.checkpoint import load_config, load_puzzle, load_tokenizer, puzzle_config_from
from puzzle.model.family import is_hybrid
from puzzle.outputs import check_output
from puzzle.search_space import refuse_hybrid

FORMATS = ("gguf", "nemotron-nas", "anymodel", "plain", "nemotron-h-puzzle")


# The engines that read each format, the default first. A nemotron-nas export is for one of them (--engine)
# and is held to that engine's rules (puzzle/engines.py): vLLM builds neither linear sublayers nor a first
# layer without attention, SGLang not variable GQA either, while TensorRT-LLM and transformers build them all.
# GGUF is llama.cpp's. AnyModel is Puzzletron's (its own block check, `check_anymodel`); it writes model_type
# llama, so its families are those a Llama layer computes, as for vLLM. Plain is the parent family's own
# checkpoint (export/plain.py), loaded by transformers' class of the family without remote code; a child
# of an MoE family (served by transformers only: family.py) is written plain when its layers are uniform,
# else as nemotron-nas for transformers (trust_remote_code).
# NemotronHPuzzle is vLLM's layout for NemotronH children (docs/architecture.md, its contract); what is tested is
# transformers loading it with the code it carries, so that is the engine it is held to.
FORMAT_ENGINES = {"gguf": ("llamacpp",), "nemotron-nas": ("vllm", "sglang", "trtllm", "transformers"),
                  "anymodel": ("vllm",), "plain": ("transformers",), "nemotron-h-puzzle": ("transformers",)}


def format_engine(format: str, engine: str | None) -> str:
    """The engine an export in `format` is for: `engine`, or the format's default; one line if the format does
    not carry that engine."""
    engines = FORMAT_ENGINES[format]
    if engine is None:
        return engines[0]
    if engine not in engines:
        choose = f"choose {', '.join(engines)}" if len(engines) > 1 else "it has no --engine choice"
        raise PuzzleError(f"cannot export as {format} for engine {engine!r}: {choose}")
    return engine


def _check(format: str, engine: str, blocks: list, hidden_size: int, config=None) -> None:
    """The format's and its engine's rules on the config and blocks alone, before any weight is read: a family
    whose layers the engine would misread (q/k/v-only biases, q/k norms, sliding windows) or a block it cannot
    build is refused in one line, naming the format's engines that can serve the child."""
    hybrid_gguf = format == "gguf" and config is not None and is_hybrid(config)
    if config is not None and not hybrid_gguf:  # a hybrid's GGUF is llama.cpp's nemotron_h, checked below
        try:
            check_family(engine, config)
        except PuzzleError as err:
            raise PuzzleError(f"cannot export as {format}: {err}") from None
    if format == "plain":
        from .plain import plain_config

        plain_config(config)  # one line where the family's own config cannot describe the layers
    elif hybrid_gguf:
        from .nemotron_h_gguf import check_nemotron_h_gguf

        check_nemotron_h_gguf(config)
    elif format == "gguf":
        from .llamacpp import check_llamacpp

        check_llamacpp(blocks, hidden_size)
    elif format == "nemotron-h-puzzle":
        from .nemotron_h_puzzle import check_nemotron_h_puzzle

        check_nemotron_h_puzzle(config)
    elif format == "nemotron-nas":
        from .nemotron_nas import check_ffn_grid

        check_ffn_grid(blocks, hidden_size)
        try:
            check_child(engine, blocks, hidden_size)
        except PuzzleError as err:
            able = [e for e in FORMAT_ENGINES[format] if not violations(get_engine(e), blocks, hidden_size)]
            hint = f"; --engine {' or '.join(able)} can serve it" if able else ""
            raise PuzzleError(f"cannot export as {format} for {engine}: {err}{hint}") from None
    else:
        from .anymodel import check_anymodel

        check_anymodel(blocks)


def export(child: Path, out: Path, format: Literal["gguf", "nemotron-nas", "anymodel", "plain", "nemotron-h-puzzle"] = "gguf",
           dtype: str = "auto", engine: str | None = None, force: bool = False) -> Path:
    """Write a child (or a parent, as an all-parent child) in a format an inference engine loads.

    Args:
        child: a child checkpoint directory, or a parent (Hugging Face directory, .safetensors or .gguf file)
        out: the .gguf file (gguf) or the directory (nemotron-nas, anymodel, plain) to write
        format: gguf (llama.cpp's deci architecture; a hybrid child: nemotron_h / nemotron_h_moe), nemotron-nas (vLLM, SGLang, TensorRT-LLM, transformers
            with trust_remote_code), anymodel (NVIDIA Puzzletron) or plain (the parent family's own checkpoint,
            e.g. MixtralForCausalLM's, for a child whose layers are all alike: same KV heads, experts, top-k) or nemotron-h-puzzle
            (a NemotronH child as vLLM's NemotronHPuzzleForCausalLM; transformers with trust_remote_code)
        dtype: weights: fp32, fp16 or q8_0 for gguf (auto: fp16); fp32, fp16 or bf16 for the others (auto: as
            stored); torch's names (float32, ...) and llama.cpp's (f32, f16) work too
        engine: the engine the export is for, whose rules every layer must meet: nemotron-nas: vllm (default),
            sglang, trtllm or transformers; gguf: llamacpp; anymodel: Puzzletron's own check; plain: transformers
        force: replace an earlier output of another puzzle command at OUT (never anything else)
    """
    if format not in FORMATS:
        raise PuzzleError(f"unknown export format {format!r}; choose {', '.join(FORMATS)}")
    engine = format_engine(format, engine)
    check_output(Path(out), "export", force=force, inputs=(child,), file=format == "gguf")
    stored = load_config(child)
    config = puzzle_config_from(stored)
    if format not in ("nemotron-h-puzzle", "gguf"):  # the writers of hybrids (issue 26)
        refuse_hybrid(config, "export --format " + format)
    _check(format, engine, config.blocks, config.hidden_size, config)  # refuse before seconds of weight loading
    if format == "gguf":
        from .llamacpp import GGUF_DTYPES, write_gguf

        name = dtypes.name_of(dtype)  # fp32 / fp16 (torch's names too) -> llama.cpp's f32 / f16
        weights = "f16" if dtype == "auto" else (dtypes.BY_NAME[name].gguf if name else dtype)
        if weights not in GGUF_DTYPES:
            raise PuzzleError(f"GGUF dtype {dtype!r} not supported; choose auto, {', '.join(GGUF_DTYPES)}")
    else:
        from .fields import safetensors_dtype

        weights = safetensors_dtype(dtype, getattr(stored, "dtype", None) or getattr(stored, "torch_dtype", None))
    # loaded once, in its stored dtype (built on the meta device, filled from safetensors); each writer
    # converts tensor by tensor to the export's dtype
    model = load_puzzle(child, dtype=None)
    tokenizer = load_tokenizer(child)
    out = Path(out)
    if format == "gguf":
        write_gguf(model, tokenizer, out, weights, name=Path(child).stem)
    elif format == "nemotron-h-puzzle":
        from .nemotron_h_puzzle import write_nemotron_h_puzzle

        write_nemotron_h_puzzle(model, tokenizer, out, weights)
    elif format == "nemotron-nas":
        from .nemotron_nas import write_nemotron_nas

        write_nemotron_nas(model, tokenizer, out, weights)
    elif format == "plain":
        from .plain import write_plain

        write_plain(model, tokenizer, out, weights)
    else:
        from .anymodel import write_anymodel

        write_anymodel(model, tokenizer, out, weights)
    size = sum(p.stat().st_size for p in ([out] if out.is_file() else out.rglob("*")) if p.is_file())
    print(f"wrote {out}: {format}, {config.num_hidden_layers} layers, {size / 2**20:.1f} MiB")
    return out
