"""The run directory's layout, in one place: every path a stage writes or reads under `runs/R/`, and every
naming rule (`name-2` solutions, `+gkd` rows, distill's `out/model`, `pruning.json` beside a pruned model).

    R/parent.json               the run's parent and search space (below)
    R/parent/                   the parent converted once to safetensors (`convert_parent`)
    R/data/                     prepare-data: train.bin, val.bin, meta.json
    R/importance/               importance: Minitron activation scores
    R/library/                  build-library: one safetensors per trained variant + manifest.json
    R/scores/scores.parquet     score: replace-1-block table (+ .csv, scores.json)
    R/costs/P.{parquet,csv,json}  profile: one hardware profile's costs
    R/solutions/NAME.json       solve: one solution (NAME, NAME-2, ... for --num-solutions)
    R/solutions/latest.txt      solve: the names its last (non-sweep) call wrote, best first
    R/solutions/pareto.{json,png}  solve --sweep
    R/children/NAME/            realize: the child of solution NAME
    R/children/NAME/gkd/model/  distill (the pipeline's GKD): the trained child
    R/baselines/NAME/           prune (the pipeline's Minitron baselines), + gkd/model/
    R/distill/STUDENT/model/    distill's default output
    R/eval/NAME.json            evaluate: one model's results (NAME+gkd after GKD)
    R/eval/cloze.jsonl          the multiple-choice task built from held-out documents
    R/pipeline.json             `puzzle run`'s ledger
    R/report.md, R/pareto.png   report
    R/.locks/STAGE.lock         the one writer of a stage (`RunDir.lock`): holder pid, host, stage, since

`parent.json`: stages after the first can be called with only `--run-dir`. A run belongs to one parent:
naming a different one is an error (its library, scores and costs would silently mix two models); the
search space may change (a new space only adds the variants it lacks). A parent and search space are
recorded only once they are known good (a supported config, a space that resolves against it), so a
rejected one never claims the run.

One writer per stage per run directory: `RunDir.lock(stage)` (and the `@writes_run_dir` decorator every
stage function wears) holds an exclusive `flock` on `.locks/STAGE.lock` for the stage's duration; a second
writer ends at once with one line naming the holder. The lock dies with its process (kill -9 included), so
a lock file left by a dead holder blocks nothing. The run directory must be on a filesystem with `flock`
(local, or NFS v4).

Torch-free (the CLI's `solve` and `report` start in a moment).
"""

import fcntl
import functools
import inspect
import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from puzzle.errors import PuzzleError
from puzzle.io import atomic_write_text, atomic_write_json, read_json

RUN_INFO = "parent.json"
DEFAULT_SPACE = "llama_default"
PARETO = "pareto"  # solutions/pareto.json is the sweep's, not a solution
LATEST = "latest.txt"
# Beside a model directory (not under the run's root): the rules every model-producing stage shares.
PRUNING_FILE = "pruning.json"  # written beside a pruned model by `puzzle prune`, read by distill
GKD_DIR = "gkd"  # the pipeline's GKD output of a model: MODEL/gkd
DISTILLED_MODEL = "model"  # distill writes its trained model to OUT/model
GKD_SUFFIX = "+gkd"  # the evaluation name of a model after GKD
LOCKS = ".locks"
_HELD: dict[Path, int] = {}  # lock files this process holds -> depth (a lock is reentrant within a process)


@dataclass(frozen=True)
class RunDir:
    """Paths under one run directory. `RunDir(path)`; every property is a path, nothing is created."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # ---- what the run remembers about itself -------------------------------------------------------
    @property
    def info_file(self) -> Path:
        return self.root / RUN_INFO

    def info(self) -> dict[str, Any]:
        """parent.json's contents ({} when absent)."""
        info = read_json(self.info_file) if self.info_file.exists() else {}
        if not isinstance(info, dict):
            raise PuzzleError(f"{self.info_file}: expected a JSON object")
        return info

    def resolve_info(self, parent: str | Path | None = None, search_space: str | None = None) -> dict[str, Any]:
        """{"parent": absolute path, "search_space": name}: given values are recorded, missing ones read back."""
        recorded = self.info()
        if parent is None:
            if "parent" not in recorded:
                raise PuzzleError(f"no parent model for {self.root}: pass --parent PATH once")
            parent = recorded["parent"]
        parent = Path(parent).resolve()
        if "parent" in recorded and Path(recorded["parent"]).resolve() != parent:
            raise PuzzleError(f"{self.root} belongs to parent {recorded['parent']}, not {parent}; use another --run-dir")
        if not parent.exists():
            raise PuzzleError(f"parent model not found: {parent}")
        info = {**recorded, "parent": str(parent),
                "search_space": search_space or recorded.get("search_space") or DEFAULT_SPACE}
        if info != recorded:
            check_parent(parent, info["search_space"])  # validate first, record after
            atomic_write_json(self.info_file, info)
        return info

    # ---- one writer per stage ----------------------------------------------------------------------
    def lock_file(self, stage: str) -> Path:
        return self.root / LOCKS / f"{stage}.lock"

    @contextmanager
    def lock(self, stage: str) -> Iterator[None]:
        """Hold `stage`'s lock on this run directory, or end in one line naming the holder (pid, host, since).

        An advisory `flock`: the kernel drops it when the holder exits, however it exits, so a lock file left
        by a dead process is simply taken over. Reentrant within a process (a stage may call another function
        that locks the same stage)."""
        path = self.lock_file(stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        path = path.resolve()  # one key however the run directory is spelled
        if _HELD.get(path):
            _HELD[path] += 1
            try:
                yield
            finally:
                _HELD[path] -= 1
            return
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PuzzleError(f"{self.root}: stage {stage!r} is being written by {_holder(path)}; "
                                  "wait for it to finish (or stop it) and rerun") from None
            f.truncate(0)
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
                                "since": time.strftime("%Y-%m-%dT%H:%M:%S")}))
            f.flush()
            _HELD[path] = 1
            try:
                yield
            finally:
                del _HELD[path]
                fcntl.flock(f, fcntl.LOCK_UN)

    @property
    def converted_parent(self) -> Path:
        return self.root / "parent"

    # ---- stage outputs ------------------------------------------------------------------------------
    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def importance(self) -> Path:
        return self.root / "importance"

    @property
    def library(self) -> Path:
        return self.root / "library"

    @property
    def scores(self) -> Path:
        return self.root / "scores"

    @property
    def scores_table(self) -> Path:
        """scores/scores without suffix: .parquet and .csv sit beside each other (see io.write_table)."""
        return self.scores / "scores"

    @property
    def costs_dir(self) -> Path:
        return self.root / "costs"

    def costs(self, profile: str) -> Path:
        """costs/<profile name> without suffix (.parquet, .csv and .json sit beside each other)."""
        return self.costs_dir / profile

    # ---- solutions ----------------------------------------------------------------------------------
    @property
    def solutions(self) -> Path:
        return self.root / "solutions"

    def solution(self, name: str) -> Path:
        return self.solutions / f"{name}.json"

    @staticmethod
    def solution_name(base: str, rank: int) -> str:
        """solve's names for --num-solutions: the best is `base`, then base-2, base-3, ..."""
        return base if rank == 1 else f"{base}-{rank}"

    @property
    def pareto_json(self) -> Path:
        return self.solutions / f"{PARETO}.json"

    @property
    def pareto_png(self) -> Path:
        return self.solutions / f"{PARETO}.png"

    @property
    def latest_solve(self) -> Path:
        return self.solutions / LATEST

    def solution_names(self) -> list[str]:
        """Every solution solve wrote, in file-name order (the sweep's pareto.json is not one)."""
        return [p.stem for p in sorted(self.solutions.glob("*.json")) if p.stem != PARETO]

    def record_solve(self, names: list[str]) -> Path:
        """Remember what the last `solve` wrote, best first, so `realize` without --solution takes it."""
        return atomic_write_text(self.latest_solve, "".join(f"{n}\n" for n in names))

    def find_solution(self, solution: str | None = None) -> Path:
        """A solution's file: a name under solutions/, a path to a .json, or (None) the best of what the last
        `solve` wrote, else the run's only solution; a one-line error listing what exists otherwise."""
        if solution is not None and Path(solution).suffix == ".json":
            if not Path(solution).exists():
                raise PuzzleError(f"solution file not found: {solution}")
            return Path(solution)
        have = self.solution_names()
        listing = f"; solutions in {self.root}: {', '.join(have)}" if have else "; run puzzle solve first"
        if solution is not None:
            if not self.solution(solution).exists():
                raise PuzzleError(f"no solution {solution!r} in {self.root}{listing}")
            return self.solution(solution)
        latest = self.latest_solve.read_text().split() if self.latest_solve.exists() else []
        if latest and latest[0] in have:
            return self.solution(latest[0])
        if len(have) == 1:
            return self.solution(have[0])
        if not have:
            raise PuzzleError(f"no solution in {self.root}{listing}")
        raise PuzzleError(f"which solution? solve recorded none as its latest in {self.root}{listing}; "
                          "pass --solution NAME")

    # ---- models -------------------------------------------------------------------------------------
    @property
    def children(self) -> Path:
        return self.root / "children"

    def child(self, solution: str) -> Path:
        return self.children / solution

    @property
    def baselines(self) -> Path:
        return self.root / "baselines"

    def baseline(self, name: str) -> Path:
        return self.baselines / name

    def distill_out(self, student: Path) -> Path:
        """distill's default output directory for a student (a checkpoint dir or a single weights file)."""
        student = Path(student)
        return self.root / "distill" / (student.stem if student.is_file() else student.name)

    @staticmethod
    def gkd_dir(model: Path) -> Path:
        """Where the pipeline's GKD of a model writes (distill's `out`)."""
        return Path(model) / GKD_DIR

    @staticmethod
    def distilled_model(out: Path) -> Path:
        """The trained model inside a distill output directory."""
        return Path(out) / DISTILLED_MODEL

    @staticmethod
    def pruning_record(model: Path) -> Path:
        """pruning.json of a pruned model: inside its directory, or beside a single weights file."""
        model = Path(model)
        return (model if model.is_dir() else model.parent) / PRUNING_FILE

    # ---- evaluation and report ----------------------------------------------------------------------
    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def eval_result(self, name: str) -> Path:
        return self.eval / f"{name}.json"

    def eval_names(self) -> list[str]:
        """Every evaluated model's name, in file-name order."""
        return [p.stem for p in sorted(self.eval.glob("*.json"))]

    @staticmethod
    def gkd_name(name: str) -> str:
        """The evaluation name of a model after GKD."""
        return f"{name}{GKD_SUFFIX}"

    @property
    def mc_tasks(self) -> Path:
        return self.eval / "cloze.jsonl"

    @property
    def ledger(self) -> Path:
        return self.root / "pipeline.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def report_pareto(self) -> Path:
        return self.root / f"{PARETO}.png"


def _holder(path: Path) -> str:
    """'pid P on HOST since T' from a held lock file (written by its holder right after it took the lock)."""
    try:
        h = json.loads(path.read_text())
        return f"pid {h['pid']} on {h['host']} since {h['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its name yet)"


F = TypeVar("F", bound=Callable[..., Any])


def writes_run_dir(stage: str) -> Callable[[F], F]:
    """Decorate a stage function that writes into its `run_dir` argument: it runs holding `RunDir.lock(stage)`
    (no lock when `run_dir` is None). The signature, docstring and defaults stay the function's (the CLI and
    the pipeline read them)."""

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            run_dir = bound.arguments.get("run_dir")
            if run_dir is None:
                return fn(*args, **kwargs)
            with RunDir(run_dir).lock(stage):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def check_parent(parent: str | Path, search_space: str | Path) -> None:
    """A parent a run can use: its config loads (no weights; a GGUF's metadata only) and is of a supported
    architecture, and the search space resolves against its shape. One line otherwise."""
    from puzzle.model.checkpoint import load_config
    from puzzle.search_space import load_search_space

    load_search_space(search_space, load_config(parent))


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    return RunDir(run_dir).info()


def resolve_run_info(run_dir: str | Path, parent: str | Path | None = None, search_space: str | None = None) -> dict[str, Any]:
    """{"parent": absolute path, "search_space": name}: given values are recorded, missing ones read back."""
    return RunDir(run_dir).resolve_info(parent, search_space)


def run_parent(run_dir: str | Path, parent: str | Path | None = None, search_space: str | None = None) -> tuple[Path, str]:
    """(parent path, search space name) of a run; see `resolve_run_info`."""
    info = resolve_run_info(run_dir, parent, search_space)
    return Path(info["parent"]), info["search_space"]
