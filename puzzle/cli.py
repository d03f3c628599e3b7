"""`puzzle` command line: every stage of the pipeline is a plain typed function; its signature is the CLI.

Commands come from the stage registry (`puzzle/stages.py`) and are imported lazily, so `puzzle --help`
answers without importing torch. Each function's docstring gives the command's help (first line) and
its arguments' help (`name: text` lines under "Args:"). Parameters without a default are positional; the rest become `--flags`.
"""

import argparse
import errno
import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable

from puzzle.stages import COMMANDS


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
    for name, stage in COMMANDS.items():
        print(f"  {name:<{width}}  {stage.summary}")


def _quiet_libraries() -> None:
    """Our stages show their own progress; transformers' per-load bars and advisories are noise here."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _fail(message: str) -> int:
    print(f"puzzle: error: {message}", file=sys.stderr)
    return 2


def _check_values(args: dict[str, Any]) -> None:
    """The rules `puzzle run --check` holds a config to (`stages.value_problem`: finite numbers, positive
    budgets and sizes), for flags: `--speedup inf` or `--memory-gib nan` is one line before anything runs."""
    from puzzle.errors import PuzzleError
    from puzzle.stages import value_problem

    for name, value in args.items():
        problem = value_problem(name, value)
        if problem is not None:
            raise PuzzleError(f"--{name.replace('_', '-')} {problem}")


# What to do about an OSError, by errno: (exit code, advice). 1: the environment (a full disk, a failing device),
# 2: the user's path (a directory where a file goes, no permission). Anything else: 1, with generic advice.
_OS_ERRORS = {
    errno.ENOSPC: (1, "the disk is full: free space (or choose another path) and rerun the same command; finished "
                      "work is kept and nothing half-written is used"),
    errno.EDQUOT: (1, "the disk quota is exhausted: free space and rerun the same command; finished work is kept"),
    errno.EROFS: (1, "the filesystem is read-only: choose a writable path"),
    errno.EIO: (1, "the device reported an I/O error: check the disk and rerun"),
    errno.EACCES: (2, "permission denied: choose a path you may write, or fix its permissions"),
    errno.EPERM: (2, "operation not permitted: choose a path you may write, or fix its permissions"),
    errno.EISDIR: (2, "it is a directory where a file is expected: name a file"),
    errno.ENOTDIR: (2, "a part of the path is a file where a directory is expected: choose another path"),
    errno.ENOENT: (2, "no such file or directory: check the path"),
    errno.ELOOP: (2, "it is a symbolic link where puzzle does not follow one: remove it or name the real path"),
    errno.ENAMETOOLONG: (2, "the name is too long: choose a shorter one"),
}


def _os_error(err: OSError) -> int:
    """One line for an OSError (a full disk, a directory where a file goes): the path and what to do. Our
    writes are atomic, so what it interrupted left nothing half-written behind."""
    code, advice = _OS_ERRORS.get(err.errno, (1, "rerun once the cause is fixed; finished work is kept"))
    path = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    reason = err.strerror or str(err) or type(err).__name__
    print(f"puzzle: error: {path + ': ' if path else ''}{reason.splitlines()[0]}; {advice}", file=sys.stderr)
    return code


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

    fn = COMMANDS[name].load()
    args = build_parser(name, fn).parse_args(rest)
    _quiet_libraries()
    try:
        _check_values(vars(args))
        fn(**vars(args))
    except (PuzzleError, BlockConfigError) as err:
        return _fail(str(err))
    except OSError as err:
        return _os_error(err)
    except KeyboardInterrupt:
        return _fail("interrupted; rerun the same command to resume")
    return 0


if __name__ == "__main__":
    sys.exit(main())
