"""`puzzle` command line: every stage of the pipeline is a plain typed function; its signature is the CLI.

Commands are imported lazily so `puzzle --help` answers without importing torch. Each function's
docstring gives the command's help (first line) and its arguments' help (`name: text` lines under
"Args:"). Parameters without a default are positional; the rest become `--flags`.
"""

import argparse
import importlib
import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable

# command -> "module:function". Order is the pipeline's order (DESIGN.md).
COMMANDS: dict[str, str] = {
    "convert": "puzzle.model.convert:convert",
    "prepare-data": "puzzle.data.prepare:prepare_data",
    "importance": "puzzle.pruning.commands:importance",
    "prune": "puzzle.pruning.commands:prune",
    "distill": "puzzle.distill.commands:distill",
    "build-library": "puzzle.library.commands:build_library",
    "score": "puzzle.scoring.commands:score",
    "profile": "puzzle.profiling.commands:profile",
    "solve": "puzzle.solver.commands:solve",
    "realize": "puzzle.realize.commands:realize",
    "evaluate": "puzzle.evaluate.commands:evaluate",
    "report": "puzzle.report.commands:report",
    "run": "puzzle.pipeline:run",
}

SUMMARIES: dict[str, str] = {
    "convert": "load a parent (HF dir, safetensors or GGUF) and write it as an all-parent heterogeneous child",
    "prepare-data": "tokenise a corpus into packed train/validation blocks in the run directory",
    "importance": "Minitron activation importance of heads, neurons, channels and layers (forward only)",
    "prune": "Minitron width/depth pruning to a standard Llama checkpoint",
    "distill": "knowledge distillation of a student from a teacher (Minitron retraining, Puzzle GKD)",
    "build-library": "block library: pruned initialisation + blockwise local distillation on Ray",
    "score": "replace-1-block quality of every library variant (KL, LM loss, agreement)",
    "profile": "latency and memory of every variant on a hardware profile",
    "solve": "MIP: one attention and one FFN variant per layer under a hardware budget",
    "realize": "assemble a child checkpoint from a solution and the library",
    "evaluate": "perplexity, KL, agreement, multiple choice and throughput of a model",
    "report": "report.md and pareto.png for a run directory",
    "run": "every stage in order from a YAML config, each resumable",
}


def _docstring_args(fn: Callable) -> tuple[str, dict[str, str]]:
    doc = inspect.getdoc(fn) or ""
    lines = doc.splitlines()
    summary = lines[0] if lines else ""
    helps: dict[str, str] = {}
    in_args = False
    current = None
    for line in lines[1:]:
        stripped = line.strip()
        if stripped in ("Args:", "Arguments:"):
            in_args = True
            continue
        if not in_args:
            continue
        if stripped and not line.startswith(" " * 8) and ":" in stripped:
            name, text = stripped.split(":", 1)
            current = name.strip()
            helps[current] = text.strip()
        elif stripped and current:
            helps[current] += " " + stripped
        elif not stripped:
            current = None
    return summary, helps


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def build_parser(name: str, fn: Callable) -> argparse.ArgumentParser:
    summary, helps = _docstring_args(fn)
    parser = argparse.ArgumentParser(prog=f"puzzle {name}", description=summary)
    hints = typing.get_type_hints(fn)
    for pname, param in inspect.signature(fn).parameters.items():
        tp = _unwrap_optional(hints.get(pname, str))
        help_text = helps.get(pname, "")
        flag = "--" + pname.replace("_", "-")
        if tp is bool:
            parser.add_argument(
                flag, dest=pname, action=argparse.BooleanOptionalAction, default=param.default, help=help_text
            )
            continue
        kwargs: dict[str, Any] = {"help": help_text}
        if typing.get_origin(tp) is list:
            kwargs["nargs"] = "+"
            tp = typing.get_args(tp)[0]
        if typing.get_origin(tp) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(tp))
            tp = type(kwargs["choices"][0])
        kwargs["type"] = tp if tp in (int, float, str, Path) else str
        if param.default is inspect.Parameter.empty:
            parser.add_argument(pname, **kwargs)
        else:
            if param.default is not None:
                kwargs["help"] = f"{help_text} (default: {param.default})".strip()
            parser.add_argument(flag, dest=pname, default=param.default, **kwargs)
    return parser


def _print_overview() -> None:
    print("usage: puzzle COMMAND [ARGS]   (puzzle COMMAND --help for a command's arguments)\n")
    print("Puzzle-style NAS: turn a Hugging Face decoder LLM into a faster heterogeneous child.\n")
    print("commands, in pipeline order:")
    width = max(map(len, COMMANDS))
    for name in COMMANDS:
        print(f"  {name:<{width}}  {SUMMARIES[name]}")


def _quiet_libraries() -> None:
    """Our stages show their own progress; transformers' per-load bars and advisories are noise here."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _fail(message: str) -> int:
    print(f"puzzle: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        _print_overview()
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        return _fail(f"unknown command {name!r}; commands: {', '.join(COMMANDS)}")
    from puzzle.errors import PuzzleError
    from puzzle.model.blocks import BlockConfigError

    module_name, fn_name = COMMANDS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            return _fail(f"'{name}' is not built yet")
        raise
    fn = getattr(module, fn_name)
    args = build_parser(name, fn).parse_args(rest)
    _quiet_libraries()
    try:
        fn(**vars(args))
    except (PuzzleError, BlockConfigError) as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        return _fail("interrupted; rerun the same command to resume")
    return 0


if __name__ == "__main__":
    sys.exit(main())
