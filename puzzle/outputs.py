"""Output paths a user names (`realize --out`, `prune P OUT`, `export C OUT`, `convert P OUT`, `distill --out`,
`profile --output`, correct-teacher's R/teacher): what may be written there, and the marker that says a path is an earlier output of ours.

The rule (docs/reliability.md "Outputs, names and temporaries"), checked before any work starts:
- nothing there, or an empty directory: written;
- an earlier output of the same command (its marker names the command): replaced;
- an earlier output of another puzzle command: replaced only with --force;
- anything else (a user's directory or file): refused, --force or not: we never delete what we did not write;
- refused always: the run directory itself or a directory holding it, one of the run's own areas (library/,
  scores/, solutions/, ...: everything but the model directories under children/, baselines/, distill/),
  one of the command's inputs or a directory holding one, and a symbolic link (replacing it would drop the
  link, not what it points to).

The marker: `.puzzle-output.json` inside a directory output ({"command": ...}), written into the temporary
directory with the rest so it is committed atomically; a GGUF carries the key `puzzle.output`, a JSON file
the key `puzzle_output`, a calibrated profile its first comment line. A model directory under a run's children/, baselines/ or distill/ (or the
run's converted parent/) written before markers existed is the pipeline's own (the run directory is ours):
an earlier output of any command.

Torch-free.
"""

import json
import struct
from pathlib import Path
from typing import Any, Iterable

from puzzle.errors import PuzzleError
from puzzle.io import atomic_write_json
from puzzle.model.dimensions import read_gguf_header
from puzzle.run_dir import LOCKS, RUN_INFO, RunDir

MARKER = ".puzzle-output.json"
GGUF_KEY = "puzzle.output"  # a GGUF's marker: the command that wrote it
JSON_KEY = "puzzle_output"  # a JSON file's marker (plan --json): a top-level key naming the command
CALIBRATED_HEADER = "# Calibrated by `puzzle profile --calibrate"  # a calibrated profile's marker
ANY = "*"  # owner() of a legacy pipeline output: an earlier output of whichever command asks


def marker(command: str) -> dict[str, Any]:
    """The marker as `save_checkpoint`'s `extra_json` takes it: {MARKER: payload}."""
    return {MARKER: {"command": command, "written_by": "puzzle"}}


def write_marker(directory: Path, command: str) -> Path:
    """Mark a directory a command fills in place (distill's output) as that command's."""
    return atomic_write_json(Path(directory) / MARKER, marker(command)[MARKER])


def enclosing_run(path: Path) -> Path | None:
    """The run directory `path` is in or is (the nearest directory whose parent.json records a parent), else
    None."""
    for candidate in [path, *path.parents]:
        try:
            info = json.loads((candidate / RUN_INFO).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and "parent" in info:
            return candidate
    return None


def _managed(run: Path) -> list[Path]:
    """The run's areas holding model directories that commands write by name (children/NAME, ...)."""
    r = RunDir(run)
    return [r.children, r.baselines, r.root / "distill"]


def _protected(run: Path, command: str) -> list[Path]:
    """The run's own areas: no named output may be one of them or lie inside one."""
    r = RunDir(run)
    areas = [r.info_file, r.data, r.importance, r.library, r.scores, r.costs_dir, r.solutions, r.eval,
             r.ledger, r.report, r.report_pareto, r.report_router_load, r.root / LOCKS]
    if command != "convert":  # the pipeline converts a GGUF parent once into R/parent
        areas.append(r.converted_parent)
    if command != "correct_teacher":  # the run's corrected parent (teacher correction) is that command's alone
        areas.append(r.teacher)
    return areas


def _gguf_owner(path: Path) -> str | None:
    # the header's scalars alone (`read_gguf_header`: milliseconds, where gguf's GGUFReader builds every
    # vocabulary entry first, about a minute for a 256K vocabulary)
    try:
        owner = read_gguf_header(path).metadata.get(GGUF_KEY)
    except (OSError, ValueError, struct.error):  # not a GGUF, or a damaged one: not ours to replace (a user's file)
        return None
    return owner if isinstance(owner, str) else None


def owner(path: Path) -> str | None:
    """The puzzle command whose earlier output `path` is (ANY for a legacy pipeline output), or None."""
    path = Path(path)
    if path.is_dir():
        try:
            command = json.loads((path / MARKER).read_text()).get("command")
            return command if isinstance(command, str) else None
        except (OSError, ValueError, AttributeError):
            pass
        run = enclosing_run(path.parent)
        if run is not None and (any(area in path.parents for area in _managed(run))
                                or path == RunDir(run).converted_parent):
            return ANY
        return None
    if path.suffix == ".gguf":
        return _gguf_owner(path)
    if path.suffix == ".json":
        try:
            command = json.loads(path.read_text()).get(JSON_KEY)
            return command if isinstance(command, str) else None
        except (OSError, ValueError, AttributeError):
            return None
    if path.suffix in (".yaml", ".yml"):
        try:
            with open(path, errors="replace") as f:
                return "profile" if f.readline().startswith(CALIBRATED_HEADER) else None
        except OSError:
            return None
    return None


def _inside(path: Path, area: Path) -> bool:
    return path == area or area in path.parents


def check_output(out: Path, command: str, *, force: bool = False, inputs: Iterable[Path | None] = (),
                 run_dir: Path | None = None, file: bool = False) -> Path:
    """`out` when `command` may write it (see the module's docstring), else a one-line PuzzleError.
    `file`: the output is a file (a GGUF, a profile), not a directory."""
    out = Path(out)
    flag = "--out" if command in ("realize", "distill") else "the output path"
    if out.is_symlink():
        raise PuzzleError(f"{out} is a symbolic link; name the real path as the output (a symlink there is "
                          "never replaced)")
    where = out.resolve()
    runs = {enclosing_run(where.parent)} | ({Path(run_dir).resolve()} if run_dir is not None else set())
    for run in filter(None, runs):
        if _inside(run, where):
            raise PuzzleError(f"{out} is or holds the run directory {run}; choose {flag} outside it "
                              "(puzzle never writes a model over a run directory)")
        for area in _protected(run, command) + _managed(run):
            if _inside(where, area) and not (area in _managed(run) and where != area):
                raise PuzzleError(f"{out} is inside the run's own {area.relative_to(run)}; choose {flag} "
                                  f"elsewhere (a new directory under {run / 'children'} or outside the run)")
    for given in filter(None, inputs):
        source = Path(given).resolve()
        if _inside(source, where):
            raise PuzzleError(f"{out} is or holds the input {given}; choose {flag} that does not overwrite "
                              "what this command reads")
    if not out.exists():
        return out
    if file and out.is_dir():
        raise PuzzleError(f"{out} is a directory; puzzle {command} writes a file there: name the file "
                          f"itself (e.g. {out / 'model.gguf'})")
    if not file and not out.is_dir():
        raise PuzzleError(f"{out} is a file; puzzle {command} writes a directory: choose a new or empty one")
    if out.is_dir() and not any(out.iterdir()):
        return out
    who = owner(out)
    if who in (command, ANY) or (who is not None and force):
        return out
    if who is not None:
        raise PuzzleError(f"{out} holds the output of puzzle {who}; pass --force to replace it with this "
                          f"{command}'s, or choose another output path")
    what = "exists" if file else "is not empty"
    raise PuzzleError(f"{out} {what} and was not written by puzzle (no {MARKER if not file else 'puzzle marker'}); "
                      "choose a new or empty output path: puzzle never deletes what it did not write "
                      "(--force replaces only an earlier puzzle output)")


def replaceable(out: Path) -> bool:
    """Whether an atomic directory commit may set `out` aside and delete it: absent, an empty directory or
    an earlier output of ours (the last check before anything is deleted, whatever the caller checked)."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        return False
    return not out.exists() or not any(out.iterdir()) or owner(out) is not None
