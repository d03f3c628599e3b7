"""The run directory's layout, in one place: every path a stage writes or reads under `runs/R/`, and every
naming rule (`name-2` solutions, `+gkd` rows, distill's `out/model`, `pruning.json` beside a pruned model).

    R/parent.json               the run's parent and search space (below)
    R/parent/                   the parent converted once to safetensors (`convert_parent`)
    R/data/                     prepare-data: train.bin, val.bin, meta.json
    R/teacher/                  correct-teacher: the parent fine-tuned on the run's data (teacher correction):
                                model/ (the corrected parent), teacher.json (what it came from), log, checkpoints
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
search space may change (a new space only adds the variants it lacks). It also records the parent's
content fingerprint (`puzzle/model/fingerprint.py`), updated when the file at that path changed: each
artefact made from the parent records the fingerprint it was made from and is redone on a mismatch. A parent and search space are
recorded only once they are known good (a supported config, a space that resolves against it), so a
rejected one never claims the run.

Teacher correction (`puzzle correct-teacher`) makes the corrected parent the run's parent: parent.json then
records `parent` = R/teacher/model (with its fingerprint) and `parent_original` (+ `parent_original_fingerprint`),
the parent it was corrected from. Every later stage reads and compares the corrected one (`check_parent`): a
stage handed the original (or any other) parent refuses, so a run never mixes the two.

One writer per stage per run directory: `RunDir.lock(stage)` (and the `@writes_run_dir` decorator every
stage function wears) holds an exclusive `flock` on `.locks/STAGE.lock` for the stage's duration; a second
writer ends at once with one line naming the holder. The lock dies with its process (kill -9 included), so
a lock file left by a dead holder blocks nothing. The run directory must be on a filesystem with `flock`
(local, or NFS v4).

A run directory may also be an fsspec URI (`s3://bucket/runs/R`, `gs://...`, `memory://R`, `file:///abs/R`):
no filesystem need be shared with anyone. The process that runs a stage (the driver) mirrors the URI into a
local cache (`staged`: `$PUZZLE_CACHE/runs/<sha of the URI>`, default ~/.cache/puzzle), every stage works on
that local directory as on any other, and what the stage changed is uploaded when it ends (also when it
fails, so its finished work is kept): each file under a temporary name, then renamed, in the order the stage
wrote them (a variant's file before the manifest that lists it). Ray workers never open the run directory
(puzzle/cluster.py: inputs and results travel through Ray's object store), so a URI works on a cluster with
no shared filesystem. The stage lock is the driver's: one driver per run URI at a time.

Torch-free (the CLI's `solve` and `report` start in a moment).
"""

import errno
import fcntl
import functools
import hashlib
import inspect
import json
import os
import re
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from puzzle.errors import PuzzleError
from puzzle.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json

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
# after teacher correction: parent.json's key for the parent it was corrected from, and that parent's evaluation name
PARENT_ORIGINAL = "parent_original"
_HELD: dict[Path, int] = {}  # lock files this process holds -> depth (a lock is reentrant within a process)
SYNC_INDEX = ".puzzle-sync.json"  # in a staged run's local mirror: what was last pulled / pushed
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")  # two letters at least: C:/ is a Windows path, not a scheme
_MIRRORS: dict[str, "RunMirror"] = {}  # URI -> its mirror, while a stage (or `puzzle run`) has it staged
_NAME_LIMIT = 200  # bytes: under every filesystem's 255 with room for the suffixes we add (.json, .parquet.sha256)


def safe_name(name: str, what: str = "name") -> str:
    """`name` when it is one safe path component, else a one-line PuzzleError. Every name a user gives that
    becomes a path under the run directory (a solution, a profile, a baseline, an evaluation, a stage's lock)
    goes through here (each RunDir path builder calls it), so none can reach outside the run directory:
    no separator, not `.` / `..`, no leading dot (our own hidden files and temporaries), no control
    character, at most 200 bytes."""
    text = str(name)
    bad = (not text or text in (".", "..") or text.startswith(".") or "/" in text or "\\" in text
           or any(ord(c) < 32 or ord(c) == 127 for c in text) or len(text.encode()) > _NAME_LIMIT)
    if bad:
        raise PuzzleError(f"invalid {what} {text!r}: it must be one file name (no '/', '\\', leading '.', "
                          f"or control characters, at most {_NAME_LIMIT} bytes), since it names a file in the run directory")
    return text


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

    def resolve_info(self, parent: str | Path | None, search_space: str | None,
                     check: Callable[[Path, str], None]) -> dict[str, Any]:
        """{"parent": absolute path, "search_space": name}: given values are recorded, missing ones read back.
        `check(parent, search_space)` validates what is about to be recorded (`search_space.check_parent`:
        model code, which this torch-free module does not import), so a rejected parent never claims the run."""
        recorded = self.info()
        if parent is None:
            if "parent" not in recorded:
                raise PuzzleError(f"no parent model for {self.root}: pass --parent PATH once")
            parent = recorded["parent"]
        parent = Path(parent).resolve()
        self.check_parent(parent)
        if not parent.exists():
            raise PuzzleError(f"parent model not found: {parent}")
        from puzzle.model.fingerprint import fingerprint

        # the parent's content (a parent overwritten in place is another parent: what was made from the old
        # bytes records their fingerprint and is redone, see puzzle/model/fingerprint.py)
        info = {**recorded, "parent": str(parent), "parent_fingerprint": fingerprint(parent),
                "search_space": search_space or recorded.get("search_space") or DEFAULT_SPACE}
        if info != recorded:
            check(parent, info["search_space"])  # validate first, record after
            atomic_write_json(self.info_file, info)
        return info

    # ---- one writer per stage ----------------------------------------------------------------------
    def lock_file(self, stage: str) -> Path:
        return self.root / LOCKS / f"{safe_name(stage, 'stage name')}.lock"

    @contextmanager
    def lock(self, stage: str) -> Iterator[None]:
        """Hold `stage`'s lock on this run directory, or end in one line naming the holder (pid, host, since).

        An advisory `flock`: the kernel drops it when the holder exits, however it exits, so a lock file left
        by a dead process is simply taken over. Reentrant within a process (a stage may call another function
        that locks the same stage)."""
        path = self.lock_file(stage)
        if path.parent.is_symlink():
            raise PuzzleError(f"{path.parent}: is a symbolic link, not the run's lock directory; remove it and rerun")
        path.parent.mkdir(parents=True, exist_ok=True)
        # one key however the run directory is spelled; the lock file itself is not resolved: a symlink
        # planted there is refused (open_lock), never followed
        path = path.parent.resolve() / path.name
        if _HELD.get(path):
            _HELD[path] += 1
            try:
                yield
            finally:
                _HELD[path] -= 1
            return
        with open_lock(path) as f:
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

    def check_parent(self, parent: str | Path, flag: str = "--parent", corrected_only: bool = False) -> None:
        """One line unless `parent` is the run's recorded parent (or the run records none; with
        `corrected_only`, unless the run's parent is a corrected teacher). After teacher correction the
        recorded parent is the corrected one: the original parent is named as such."""
        recorded = self.info()
        if ("parent" not in recorded or (corrected_only and PARENT_ORIGINAL not in recorded)
                or Path(recorded["parent"]).resolve() == Path(parent).resolve()):
            return
        if PARENT_ORIGINAL in recorded and Path(recorded[PARENT_ORIGINAL]).resolve() == Path(parent).resolve():
            raise PuzzleError(f"{self.root}'s parent was corrected by puzzle correct-teacher: its stages use "
                              f"{recorded['parent']}, not the original {parent}; pass {flag} {recorded['parent']} "
                              "(or leave it out where the stage reads the run's parent)")
        raise PuzzleError(f"{self.root} belongs to parent {recorded['parent']}, not {Path(parent).resolve()}; "
                          "use another --run-dir")

    def record_teacher(self, original: Path, teacher: Path) -> dict[str, Any]:
        """Make the corrected `teacher` the run's parent (parent.json), remembering the `original` it came
        from; the search space (when recorded) stays. The caller checked that `original` is the run's."""
        from puzzle.model.fingerprint import fingerprint

        recorded = self.info()
        info = {**recorded, "parent": str(Path(teacher).resolve()), "parent_fingerprint": fingerprint(teacher),
                PARENT_ORIGINAL: str(Path(original).resolve()),
                f"{PARENT_ORIGINAL}_fingerprint": fingerprint(original)}
        if info != recorded:
            atomic_write_json(self.info_file, info)
        return info

    @property
    def converted_parent(self) -> Path:
        return self.root / "parent"

    @property
    def teacher(self) -> Path:
        """correct-teacher's output directory (log, checkpoints, teacher.json, model/)."""
        return self.root / "teacher"

    @property
    def teacher_model(self) -> Path:
        """The corrected parent: after teacher correction, the run's parent."""
        return self.teacher / "model"

    @property
    def teacher_record(self) -> Path:
        """teacher.json: the parent it was corrected from, its data, steps and tokens, validation before and after."""
        return self.teacher / "teacher.json"

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
        return self.costs_dir / safe_name(profile, "hardware profile name")

    # ---- solutions ----------------------------------------------------------------------------------
    @property
    def solutions(self) -> Path:
        return self.root / "solutions"

    def solution(self, name: str) -> Path:
        if name == PARETO:
            raise PuzzleError(f"invalid solution name {name!r}: solutions/{PARETO}.json is solve --sweep's")
        return self.solutions / f"{safe_name(name, 'solution name')}.json"

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
        return self.children / safe_name(solution, "solution name")

    @property
    def baselines(self) -> Path:
        return self.root / "baselines"

    def baseline(self, name: str) -> Path:
        return self.baselines / safe_name(name, "baseline name")

    def distill_out(self, student: Path) -> Path:
        """distill's default output directory for a student (a checkpoint dir or a single weights file)."""
        student = Path(student)
        return self.root / "distill" / safe_name(student.stem if student.is_file() else student.resolve().name,
                                                 "student name")

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
        return self.eval / f"{safe_name(name, 'evaluation name')}.json"

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

    @property
    def report_router_load(self) -> Path:
        """The report's plot of each MoE layer's router load per evaluated model."""
        return self.root / "router_load.png"


def open_lock(path: Path) -> Any:
    """A lock file opened for reading and writing (created when absent) without following a symbolic link:
    one planted at `path` would otherwise let us truncate whatever it points to. One line when it is one."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise PuzzleError(f"{path}: is a symbolic link, not our lock file; remove it and rerun") from None
        raise
    return os.fdopen(fd, "r+")


def _holder(path: Path, hang_s: float = 60.0) -> str:
    """'pid P on HOST since T' from a held lock file. Its holder writes it right after taking the lock, so a
    reader that comes in between waits for the name as long as the lock stays held: a busy machine can stretch
    that gap to seconds, so only `hang_s` (a holder stuck between the two) ends the wait without it."""
    deadline = time.monotonic() + hang_s
    while True:
        try:
            h = json.loads(path.read_text())
            return f"pid {h['pid']} on {h['host']} since {h['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            if not _held(path):
                return "another process (it has exited since)"
            if time.monotonic() >= deadline:
                return "another process (it has not written its name yet)"
            time.sleep(0.05)


def _held(path: Path) -> bool:
    """Whether some open file holds `path`'s flock (a shared probe is refused while a writer holds it)."""
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:  # as open_lock: never a planted link
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


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
            if is_uri(run_dir):  # the stage works on the local mirror; what it wrote is uploaded after
                with staged(run_dir) as local, RunDir(local).lock(stage):
                    bound.arguments["run_dir"] = local
                    return fn(*bound.args, **bound.kwargs)
            with RunDir(run_dir).lock(stage):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    return RunDir(run_dir).info()


# ---- run directories at fsspec URIs -------------------------------------------------------------------


def as_location(value: str | Path) -> str | Path:
    """A run directory as given: an fsspec URI (str) or a local Path. A URI that went through `Path` (the CLI's
    argument type) lost a slash ('s3:/b/k', 'file:/abs'); it is given back ('s3://b/k', 'file:///abs')."""
    text = str(value)
    match = _URI.match(text)
    if match is None:
        return Path(value)
    scheme, rest = match.group(1), text[match.end():].lstrip("/")
    return f"file:///{rest}" if scheme == "file" else f"{scheme}://{rest}"


def is_uri(value: str | Path | None) -> bool:
    return value is not None and isinstance(as_location(value), str)


def cache_dir() -> Path:
    """Where staged runs are mirrored on this machine ($PUZZLE_CACHE, default ~/.cache/puzzle)."""
    return Path(os.environ.get("PUZZLE_CACHE") or Path.home() / ".cache" / "puzzle")


def origin(run_dir: str | Path) -> str | None:
    """The URI a local directory mirrors while it is staged, else None (a plain local run directory)."""
    local = Path(run_dir).resolve()
    return next((uri for uri, m in _MIRRORS.items() if m.local.resolve() == local), None)


def describe(run_dir: str | Path) -> str:
    """One line: where the run directory is and how it is reached (the preflight prints it)."""
    uri = origin(run_dir) or (str(as_location(run_dir)) if is_uri(run_dir) else None)
    if uri is None:
        return f"run dir: {Path(run_dir).resolve()} (local path of the driver)"
    scheme = str(as_location(uri)).split(":", 1)[0]
    local = _MIRRORS[uri].local if uri in _MIRRORS else RunMirror.local_for(uri)
    return f"run dir: {uri} (fsspec {scheme}: staged at {local}, the driver uploads what each stage writes)"


def check_reachable(run_dir: str | Path) -> None:
    """Write, read back and delete a probe file in the run directory (through fsspec for a URI, in its
    mirror's origin when staged); one line when that fails."""
    import secrets

    uri = origin(run_dir) or (str(as_location(run_dir)) if is_uri(run_dir) else None)
    token = secrets.token_hex(8)
    name = f".preflight-{token}"
    fs, root = _filesystem(uri) if uri else (None, "")
    try:
        if uri is None:
            path = Path(run_dir) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(token)
            ok = path.read_text() == token
            path.unlink()
        else:
            fs.makedirs(root, exist_ok=True)
            fs.pipe_file(f"{root}/{name}", token.encode())
            ok = fs.cat_file(f"{root}/{name}") == token.encode()
            fs.rm_file(f"{root}/{name}")
    except Exception as err:  # any filesystem's error (credentials, a missing bucket, a read-only mount)
        raise PuzzleError(f"cannot write the run directory {uri or run_dir}: {type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}") from None
    if not ok:
        raise PuzzleError(f"the run directory {uri or run_dir} did not give back what was written to it")


def _filesystem(uri: str) -> tuple[Any, str]:
    try:
        import fsspec

        fs, root = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as err:  # an unknown protocol, or its package is not installed
        raise PuzzleError(f"cannot open run directory {uri}: {str(err).splitlines()[0]}") from None
    return fs, root.rstrip("/")


class RunMirror:
    """A local mirror of a run directory at an fsspec URI (see the module's docstring).

    The sync index (`SYNC_INDEX` in the mirror) records, per relative path, the remote file's identity at the
    last pull or push (size + ETag/mtime) and the local file's (size, mtime_ns) then: a pull downloads what
    changed remotely, a push uploads what changed locally."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.root = _filesystem(uri)
        self.local = self.local_for(uri)

    @staticmethod
    def local_for(uri: str) -> Path:
        return cache_dir() / "runs" / hashlib.sha256(uri.encode()).hexdigest()[:16]

    def _index(self) -> dict[str, Any]:
        path = self.local / SYNC_INDEX
        return json.loads(path.read_text()) if path.exists() else {}

    def _save_index(self, index: dict[str, Any]) -> None:
        atomic_write_json(self.local / SYNC_INDEX, index)

    @staticmethod
    def _remote_id(info: dict[str, Any]) -> str:
        stamp = next((info[k] for k in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "created") if k in info), "")
        stamp = stamp.timestamp() if hasattr(stamp, "timestamp") else stamp  # info() and find() differ in type
        return f"{info.get('size')}:{stamp}"

    def _local_id(self, rel: str) -> list[int] | None:
        path = self.local / rel
        if not path.is_file():
            return None
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]

    def _remote_files(self) -> dict[str, dict[str, Any]]:
        if not self.fs.exists(self.root):
            return {}
        found = self.fs.find(self.root, detail=True)
        prefix = self.root + "/"
        return {path[len(prefix):]: info for path, info in found.items()
                if path.startswith(prefix) and info.get("type", "file") == "file" and not _private(path[len(prefix):])}

    def pull(self) -> int:
        """Download what changed remotely since the last sync (and drop local copies of files deleted there).
        Returns the number of files downloaded."""
        self.local.mkdir(parents=True, exist_ok=True)
        index, remote = self._index(), self._remote_files()
        count = 0
        for rel, info in remote.items():
            seen = index.get(rel)
            if seen and seen["remote"] == self._remote_id(info) and seen["local"] == self._local_id(rel):
                continue
            data = self.fs.cat_file(f"{self.root}/{rel}")
            atomic_write_bytes(self.local / rel, data)
            index[rel] = {"remote": self._remote_id(info), "local": self._local_id(rel)}
            count += 1
        for rel in [r for r in index if r not in remote]:
            if index[rel]["local"] == self._local_id(rel):  # synced once, deleted remotely since
                (self.local / rel).unlink(missing_ok=True)
            del index[rel]
        self._save_index(index)
        return count

    def push(self) -> int:
        """Upload every local file changed since the last sync, oldest first (the order the stage wrote them:
        a library variant before the manifest that lists it), each under a temporary name then renamed.
        Returns the number of files uploaded."""
        index = self._index()
        changed = []
        for path in self.local.rglob("*"):
            rel = path.relative_to(self.local).as_posix()
            if path.is_file() and not _private(rel) and index.get(rel, {}).get("local") != self._local_id(rel):
                changed.append((path.stat().st_mtime_ns, rel))
        for _, rel in sorted(changed):
            target = f"{self.root}/{rel}"
            temp = f"{target}.{os.getpid()}.uploading"
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(self.local / rel), temp)
            self.fs.mv(temp, target)
            index[rel] = {"remote": self._remote_id(self.fs.info(target)), "local": self._local_id(rel)}
        self._save_index(index)
        return len(changed)


def _private(rel: str) -> bool:
    """Files of the mirror that are not the run's: the sync index, the driver's locks, temp files, uploads."""
    name = rel.rsplit("/", 1)[-1]
    return (rel == SYNC_INDEX or rel.startswith(LOCKS + "/") or name.endswith(".uploading")
            or (name.startswith(".") and name.endswith(".tmp")))


@contextmanager
def staged(run_dir: str | Path) -> Iterator[Path]:
    """The local directory a stage works in: `run_dir` itself when local; for a URI, its mirror, pulled on
    entry and pushed on exit (also after an error: finished work is kept). Reentrant: an inner stage of a
    staged `puzzle run` works in the same mirror and leaves the push to the outermost."""
    location = as_location(run_dir)
    if isinstance(location, Path):
        yield location
        return
    if location in _MIRRORS:
        yield _MIRRORS[location].local
        return
    mirror = RunMirror(location)
    mirror.pull()
    _MIRRORS[location] = mirror
    try:
        yield mirror.local
    finally:
        del _MIRRORS[location]
        mirror.push()


def sync(run_dir: str | Path) -> None:
    """Upload what changed in a staged run's mirror now (`puzzle run` after each step); no-op when local."""
    uri = origin(run_dir) or (str(as_location(run_dir)) if is_uri(run_dir) else None)
    if uri in _MIRRORS:
        _MIRRORS[uri].push()
