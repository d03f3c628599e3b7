"""`puzzle run CONFIG.yaml`: every stage in order, each skipped when its inputs and settings are unchanged.

A config names the parent, the corpus and the run directory, then one section per stage whose keys are
that stage's own arguments (the same as its CLI flags, with underscores):

    run_dir: runs/smollm2_quick
    parent: assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    corpus: assets/corpus/python-docs
    search_space: smollm2_quick
    prepare_data: {seq_len: 256, max_tokens: 400000}
    teacher_correction: {steps: 64, lr: 2.0e-5}        # optional: later stages use the corrected parent
    importance: {n_samples: 64}                      # omit a section to skip an optional stage
    build_library: {tokens_per_block: 8192}
    score: {blocks: 8}
    profile: [{budget: h100_80gb}, {budget: cpu_local}]
    solve: [{budget: h100_80gb, speedup: 1.5, name: speedup_1.5}, {budget: h100_80gb, sweep: "1.2:3.0:0.2"}]
    realize: [{solution: speedup_1.5}]
    gkd: {steps: 30, hidden_loss: cosine}            # global KD of every realised child
    evaluate: {val_blocks: 16, mc_items: 100}
    baselines: [{name: minitron_width, target_params: 80M, target_mode: width}]   # optional
    convert_parent: auto   # a GGUF parent is written once as safetensors into run_dir/parent (true / false)

Sections and their functions come from the stage registry (`puzzle/stages.py`). The ledger
`run_dir/pipeline.json` records each finished stage with a hash of its settings chained to
the hashes of the stages before it, so a rerun does no work, and changing one stage's settings reruns it
and everything after it. Each stage is itself resumable, so a crash mid-stage loses little.

The ledger never trusts itself over the files (issue 22). A step's settings include the content
fingerprints (`puzzle/model/fingerprint.py`) of the models and corpus it reads (`INPUTS`: a parent
re-exported to the same path is another parent), and its record lists the fingerprint of every file it
wrote in the run directory (found by comparing the directory before and after the step; a file belongs
to the last step that wrote it). A step is complete only when its settings hash matches and every file
it wrote is still what it wrote; a step that runs again reruns every step after it (each of which reuses
its own outputs where its inputs are unchanged). So a `puzzle solve --name fast` run by hand between two
`puzzle run`s reruns solve[fast] and everything downstream, never reports a solution beside a child made
from another.
"""

import hashlib
import inspect
import json
import os
import time
import types
import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from puzzle.errors import PuzzleError
from puzzle.io import atomic_write_json, read_json, read_yaml
from puzzle.run_dir import DEFAULT_SPACE, RunDir, as_location, describe, origin, staged, sync
from puzzle.stages import SECTIONS, check_values, stage_functions

REQUIRED = ("parent", "corpus")
# the common arguments a step reads outside what earlier steps wrote: the ledger hashes their content
INPUTS = ("parent", "teacher", "student", "model", "corpus")


@dataclass(frozen=True)
class RunConfig:
    run_dir: Path | str  # a local path, or an fsspec URI (`run` stages it: puzzle/run_dir.py)
    parent: Path
    corpus: Path
    search_space: str
    sections: dict[str, list[dict[str, Any]]]  # stage -> one or more argument dicts
    convert_parent: bool | str = "auto"  # write the parent once as safetensors in the run (auto: GGUF only)

    @classmethod
    def load(cls, path: Path, run_dir: Path | None = None) -> "RunConfig":
        raw = read_yaml(path)
        if not isinstance(raw, dict):
            raise PuzzleError(f"{path}: a pipeline config is a mapping of settings")
        missing = [k for k in REQUIRED if k not in raw]
        if missing:
            raise PuzzleError(f"{path}: missing {', '.join(missing)}")
        known = set(SECTIONS) | set(REQUIRED) | {"run_dir", "search_space", "name", "description", "convert_parent"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise PuzzleError(f"{path}: unknown keys {unknown}; stages are {', '.join(SECTIONS)}")
        sections: dict[str, list[dict[str, Any]]] = {}
        for stage in SECTIONS:
            value = raw.get(stage)
            if value is None:
                continue
            items = value if isinstance(value, list) else [value]
            if not all(isinstance(v, dict) for v in items):
                raise PuzzleError(f"{path}: '{stage}' must be a mapping of arguments or a list of them")
            sections[stage] = items
        base = path.parent.parent if path.parent.name == "configs" else path.parent
        def resolve(p: str) -> Path:  # relative paths are relative to the project holding configs/
            q = Path(p)
            return q if q.is_absolute() or q.exists() else base / q

        location = as_location(run_dir or raw.get("run_dir", f"runs/{path.stem}"))
        return cls(
            run_dir=location if isinstance(location, str) or run_dir else resolve(str(location)),
            parent=resolve(raw["parent"]),
            corpus=resolve(raw["corpus"]),
            search_space=str(raw.get("search_space", DEFAULT_SPACE)),
            sections=sections,
            convert_parent=_convert_flag(raw.get("convert_parent", "auto"), path),
        )


def _convert_flag(value: Any, path: Path) -> bool | str:
    if value in (True, False, "auto"):
        return value
    raise PuzzleError(f"{path}: convert_parent is true, false or auto, got {value!r}")


def _call(fn: Callable, common: dict[str, Any], args: dict[str, Any]) -> Any:
    params = inspect.signature(fn).parameters  # argument names were checked by check_plan before any stage ran
    kwargs = {k: v for k, v in common.items() if k in params}
    kwargs.update(args)
    for name, value in list(kwargs.items()):
        if params[name].annotation in (Path, Path | None) and isinstance(value, str):
            kwargs[name] = Path(value)
    return fn(**kwargs)


def _check_arguments(fn: Callable, args: dict[str, Any], stage: str) -> None:
    """Argument names against the stage function's signature, and values against its annotations."""
    params = inspect.signature(fn).parameters
    unknown = sorted(set(args) - set(params))
    if unknown:
        raise PuzzleError(f"config section '{stage}': unknown arguments {unknown}; allowed: {sorted(params)}")
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError):  # an annotation that does not resolve: names were checked, types cannot be
        hints = {}
    for name, value in args.items():
        expected = hints.get(name)
        if expected is not None and not _fits(value, expected):
            raise PuzzleError(f"config section '{stage}': argument {name} expects {_type_name(expected)}, "
                              f"got {value!r} ({type(value).__name__})")


def _fits(value: Any, expected: Any) -> bool:
    """Whether a YAML value can be passed where `expected` is annotated. Path takes a str, float an int;
    bool is no int; annotations this does not model (Any, classes) pass."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if expected is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if expected is type(None):
        return value is None
    if origin in (list, tuple, set):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is Path:
        return isinstance(value, (str, Path))
    if expected is str:
        return isinstance(value, str)
    return True


def _type_name(expected: Any) -> str:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if expected is type(None):
        return "None"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(expected, "__name__", str(expected))


def check_plan(cfg: RunConfig, steps: list[Any], fns: dict[str, Callable], inputs: bool = True) -> None:
    """Everything a config can get wrong that needs no computation, found before the first stage runs
    (a typo in the last section must not cost an hour of library building): argument names and types
    against each stage's signature and their values (`stages.check_values`), the search space and hardware
    profiles it names, realize entries naming a solve entry, and (with `inputs`) the parent (its config
    only: a supported architecture, the search space resolving against its shape) and the corpus (some
    readable text)."""
    from puzzle.profiling.hardware import load_profile
    from puzzle.search_space import check_parent, resolve_space_path

    if inputs:
        for what, path in (("parent", cfg.parent), ("corpus", cfg.corpus)):
            if not path.exists():
                raise PuzzleError(f"{what} not found: {path}")
        check_parent(cfg.parent, cfg.search_space)
        check_corpus(cfg.corpus)
    read_yaml(resolve_space_path(cfg.search_space))
    for step in steps:
        _check_arguments(fns[step.fn], step.args, step.name)
        check_values(step.args, step.name)
        if isinstance(step.args.get("budget"), str):
            load_profile(step.args["budget"])  # parses and validates the profile, not just its name
    # solve names its outputs `name` (default: the budget), then name-2, name-3 ... for --num-solutions
    solve_defaults = inspect.signature(fns["solve"]).parameters
    solved = set(RunDir(cfg.run_dir).solution_names())
    for args in cfg.sections.get("solve", []):
        if "sweep" not in args:
            base = args.get("name") or args.get("budget", solve_defaults["budget"].default)
            count = int(args.get("num_solutions", solve_defaults["num_solutions"].default))
            solved |= {RunDir.solution_name(base, k) for k in range(1, count + 1)}
    for args in cfg.sections.get("realize", []):
        if args["solution"] not in solved:
            raise PuzzleError(f"realize: no solve entry names its solution {args['solution']!r} "
                              f"(solutions: {', '.join(sorted(map(str, solved))) or 'none'})")


def check_corpus(path: Path) -> None:
    """Some corpus file holds text, as prepare-data decides it (`Corpus`: encodings detected, binary and
    undecodable files skipped): a wrong directory or a folder of binaries is one line before any stage runs.
    Reads up to the first document."""
    from puzzle.data.corpus import Corpus

    next(iter(Corpus(path)))  # no document at all: Corpus's one-line PuzzleError, naming what it skipped


def _settings(step: Any, fns: dict[str, Callable]) -> dict[str, Any]:
    """What a step's result depends on, for the ledger: its function, its arguments, and the contents of
    the search space and hardware profile it reads (editing `search_spaces/x.yaml` reruns the library and
    all after it; the ledger hashes this)."""
    from puzzle.profiling.hardware import resolve_profile_path
    from puzzle.search_space import resolve_space_path

    settings: dict[str, Any] = {"fn": step.fn, "args": step.args, "common": step.common}
    params = inspect.signature(fns[step.fn]).parameters
    # the parsed YAML, so an edited comment reruns nothing
    if "search_space" in params and step.common.get("search_space"):
        settings["search_space_content"] = read_yaml(resolve_space_path(step.common["search_space"]))
    if isinstance(step.args.get("budget"), str) and step.args["budget"].lower() != "none":
        settings["budget_content"] = read_yaml(resolve_profile_path(step.args["budget"]))
    settings["inputs"] = input_fingerprints(step.common)
    return settings


def input_fingerprints(common: dict[str, Any]) -> dict[str, str]:
    """The fingerprint of each model (its content) and corpus (its listing) a step reads (`INPUTS`), by name."""
    from puzzle.model.fingerprint import fingerprint, listing_fingerprint

    return {k: (listing_fingerprint if k == "corpus" else fingerprint)(v)
            for k, v in common.items() if k in INPUTS and v is not None}


class Ledger:
    """`pipeline.json`: per step, the chained hash of its settings, and the fingerprint of each file it wrote
    (relative to the run directory)."""

    def __init__(self, run_dir: Path) -> None:
        self.root = Path(run_dir)
        self.path = RunDir(run_dir).ledger
        self.entries: dict[str, Any] = read_json(self.path) if self.path.exists() else {}
        self.chain = ""

    def key(self, stage: str, settings: Any) -> str:
        self.chain = hashlib.sha256((self.chain + json.dumps(settings, sort_keys=True, default=str)).encode()).hexdigest()
        return self.chain

    def done(self, name: str, digest: str) -> bool:
        return self.entries.get(name, {}).get("sha256") == digest

    def changed(self, name: str) -> str | None:
        """The first file `name` wrote that is no longer what it wrote (changed or removed), else None."""
        from puzzle.model.fingerprint import file_fingerprint

        for rel, recorded in self.entries.get(name, {}).get("outputs", {}).items():
            path = self.root / rel
            if (file_fingerprint(path) if path.is_file() else "absent") != recorded:
                return rel
        return None

    def record(self, name: str, digest: str, wall_s: float, written: set[str] = frozenset(),
               removed: set[str] = frozenset()) -> None:
        """Step `name` finished: its hash, and the files it wrote (taken from any earlier writer's record)
        with those it wrote before and kept (a stage that found its output complete rewrites nothing: it
        vouches for what is there now); files it removed leave every record."""
        from puzzle.model.fingerprint import file_fingerprint

        kept = set(self.entries.get(name, {}).get("outputs", {}))
        for entry in self.entries.values():
            outputs = entry.get("outputs", {})
            for rel in [r for r in outputs if r in written or r in removed]:
                del outputs[rel]
        mine = sorted(r for r in (kept | set(written)) - set(removed) if (self.root / r).is_file())
        outputs = {rel: file_fingerprint(self.root / rel) for rel in mine}
        self.entries[name] = {"sha256": digest, "wall_s": round(wall_s, 2),
                              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "outputs": outputs}
        atomic_write_json(self.path, self.entries)


def _listing(root: Path, ledger: Path) -> dict[str, tuple[int, int, int]]:
    """Every file of the run directory but the ledger and hidden ones (locks, temporaries, a mirror's sync
    index) -> (size, mtime, inode): what a step wrote is what differs after it."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath) / name
            if name.startswith(".") or path == ledger:
                continue
            try:
                st = path.stat()
            except FileNotFoundError:  # removed while listed
                continue
            found[path.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return found


def run(config: Path, run_dir: Path | None = None, force: bool = False, check: bool = False) -> Path:
    """Run every stage of a pipeline config in order, skipping stages already complete.

    Args:
        config: the pipeline YAML (see configs/smollm2_quick.yaml)
        run_dir: override the config's run directory
        force: rerun every stage (each stage still reuses its own complete outputs)
        check: validate the config and print the plan (which stages would run, which are complete); run nothing
    """
    cfg = RunConfig.load(Path(config), run_dir)
    location = cfg.run_dir
    with staged(location) as local:  # a URI run works in its local mirror, uploaded after each stage
        _run(replace(cfg, run_dir=local), force, check)
    return location


def _run(cfg: RunConfig, force: bool, check: bool) -> None:
    from puzzle.pipeline_stages import plan

    fns = stage_functions()
    steps = plan(cfg, fns)
    check_plan(cfg, steps, fns)
    if check:
        preflight(cfg)
        _run_steps(cfg, steps, fns, force, check)
        print(f"config OK: {len(steps)} stages, run directory {origin(cfg.run_dir) or cfg.run_dir}")
        return
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    with RunDir(cfg.run_dir).lock("run"):  # one pipeline per run directory; each stage also locks its own
        started = time.perf_counter()
        _run_steps(cfg, steps, fns, force, check)
    print(f"pipeline complete in {time.perf_counter() - started:.1f} s: {origin(cfg.run_dir) or RunDir(cfg.run_dir).root}/"
          f"{RunDir(cfg.run_dir).report.name}")


def preflight(cfg: RunConfig) -> None:
    """`run --check`'s view of where stages run: with a Ray cluster named (RAY_ADDRESS), the cluster
    preflight (its one line; a one-line error when a node cannot reach what it needs); else the run
    directory's line and that the fanned-out stages run in this process."""
    from puzzle import cluster

    if not cluster.named(None):
        print(f"{describe(cfg.run_dir)}; no Ray cluster named (RAY_ADDRESS): every stage runs in this process")
        return
    with cluster.connected(None):
        cluster.preflight(cfg.run_dir, cfg.parent.resolve())


def _portable(settings: Any, run_dir: Path) -> Any:
    """A step's settings with a staged run's local mirror path written as its URI, so the ledger's hashes
    do not depend on the machine that drives the run."""
    uri = origin(run_dir)
    if uri is None:
        return settings
    local = json.dumps(str(run_dir))[1:-1]
    return json.loads(json.dumps(settings, default=str).replace(local, uri))


def _run_steps(cfg: RunConfig, steps: list[Any], fns: dict[str, Callable], force: bool, check: bool) -> None:
    """Each step in order, skipped when the ledger holds it with the same settings (with `check`: only say so)."""
    ledger = Ledger(cfg.run_dir)  # an absent run directory reads as an empty ledger
    stale = force  # once a step runs, every step after it runs (what it reads may have changed)
    for i, step in enumerate(steps, 1):
        digest = ledger.key(step.name, _portable(_settings(step, fns), cfg.run_dir))
        edited = None if stale or not ledger.done(step.name, digest) else ledger.changed(step.name)
        done = not stale and ledger.done(step.name, digest) and edited is None
        stale = stale or not done
        if check:
            print(f"[{i}/{len(steps)}] {step.name}: {'complete' if done else 'would run'}")
            continue
        if done:
            print(f"[{i}/{len(steps)}] {step.name}: complete, skipped")
            continue
        why = f" ({edited} is not what it wrote: running it again, and every step after it)" if edited else ""
        print(f"[{i}/{len(steps)}] {step.name} ...{why}", flush=True)
        t0 = time.perf_counter()
        before = _listing(Path(cfg.run_dir), ledger.path)
        _call(fns[step.fn], step.common, step.args)
        after = _listing(Path(cfg.run_dir), ledger.path)
        ledger.record(step.name, digest, time.perf_counter() - t0,
                      written={rel for rel, st in after.items() if before.get(rel) != st},
                      removed=set(before) - set(after))
        sync(cfg.run_dir)  # a URI run: what this stage wrote is uploaded now, not only at the end
        print(f"[{i}/{len(steps)}] {step.name}: done in {time.perf_counter() - t0:.1f} s", flush=True)
