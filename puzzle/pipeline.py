"""`puzzle run CONFIG.yaml`: every stage in order, each skipped when its inputs and settings are unchanged.

A config names the parent, the corpus and the run directory, then one section per stage whose keys are
that stage's own arguments (the same as its CLI flags, with underscores):

    run_dir: runs/smollm2_quick
    parent: assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    corpus: assets/corpus/python-docs
    search_space: smollm2_quick
    prepare_data: {seq_len: 256, max_tokens: 400000}
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
"""

import hashlib
import inspect
import json
import time
import types
import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from puzzle.errors import PuzzleError
from puzzle.io import atomic_write_json, read_json, read_yaml
from puzzle.run_dir import DEFAULT_SPACE, RunDir, as_location, check_parent, describe, origin, staged, sync
from puzzle.stages import SECTIONS, check_values, stage_functions

REQUIRED = ("parent", "corpus")


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
    from puzzle.search_space import resolve_space_path

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
    return settings


class Ledger:
    def __init__(self, run_dir: Path) -> None:
        self.path = RunDir(run_dir).ledger
        self.entries: dict[str, Any] = read_json(self.path) if self.path.exists() else {}
        self.chain = ""

    def key(self, stage: str, settings: Any) -> str:
        self.chain = hashlib.sha256((self.chain + json.dumps(settings, sort_keys=True, default=str)).encode()).hexdigest()
        return self.chain

    def done(self, name: str, digest: str) -> bool:
        return self.entries.get(name, {}).get("sha256") == digest

    def record(self, name: str, digest: str, wall_s: float) -> None:
        self.entries[name] = {"sha256": digest, "wall_s": round(wall_s, 2), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(self.path, self.entries)


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
    for i, step in enumerate(steps, 1):
        digest = ledger.key(step.name, _portable(_settings(step, fns), cfg.run_dir))
        done = not force and ledger.done(step.name, digest)
        if check:
            print(f"[{i}/{len(steps)}] {step.name}: {'complete' if done else 'would run'}")
            continue
        if done:
            print(f"[{i}/{len(steps)}] {step.name}: complete, skipped")
            continue
        print(f"[{i}/{len(steps)}] {step.name} ...", flush=True)
        t0 = time.perf_counter()
        _call(fns[step.fn], step.common, step.args)
        ledger.record(step.name, digest, time.perf_counter() - t0)
        sync(cfg.run_dir)  # a URI run: what this stage wrote is uploaded now, not only at the end
        print(f"[{i}/{len(steps)}] {step.name}: done in {time.perf_counter() - t0:.1f} s", flush=True)
