"""Ray for the stages that fan out over workers (build-library, score): connecting, what a task requests,
where a layer group's jobs are placed, the device inside a task, how inputs and results travel, and the
preflight. Ray is a scheduler here, not a dependency of the maths: each stage also runs in one process.

Connecting (`connected`): `ray.init(address)` unless this process already runs Ray; no address means
RAY_ADDRESS, else a new embedded local Ray. `named(address)` says whether a cluster was named (an address,
RAY_ADDRESS, or a Ray this process already joined): `--workers auto` is then the cluster's GPUs (its CPUs /
threads on a CPU-only cluster), else 1 (the stage runs in this process, as without Ray).

What a task requests (`job_resources`): `num_cpus` = its threads; `memory` = the host bytes its job's
estimate names (the stage's own cost model for one worker, the one `puzzle plan` prints: `library.cost.worker_estimate`,
`scoring.cost.score_cost`); on a cluster with GPUs,
`num_gpus` = the share of one GPU its estimate needs: 1/k where k jobs fit in one GPU's memory (read on
each node with nvidia-smi by the preflight), 1 when that memory is unknown. Inside a task the device is
the GPU Ray assigned (`task_device`: Ray sets CUDA_VISIBLE_DEVICES to it, so it is `cuda`), the CPU when
none was (or torch sees none). Jobs that share a layer group (several variant subsets of the same layers)
are gang-placed on one node with a STRICT_PACK placement group (`placement`): they read the same parent
layers and run the same prefix. A layer group that is one job is one task, on one node by construction.

Transport (no shared filesystem): a Ray worker never opens the run directory. The driver reads a job's
inputs from the run directory (prepared data, importance scores, library files) and ships them as bytes
through Ray's object store (`ship`); the worker unpacks them into a private temporary directory laid out
as a run directory (`unpacked`) and runs the stage's own code on it; what it produces streams back (a Ray
generator task yields each finished variant or score) and the driver writes it: the run directory has one
writer, and may be an fsspec URI the driver stages (puzzle/run_dir.py). The parent is read by each worker
from its path, which must exist on every node (a shared or replicated copy): the preflight checks it there.

Fault tolerance (`stream`): a job whose worker dies (killed, out of memory, node lost) is resubmitted by the
driver, at most `max_retries` times, with what the driver already received left out of its work. Ray's own
task retries are off: a retried generator would replay items the driver already consumed.

Preflight (`preflight`): one line saying where the run directory is and how workers reach their data, after
a probe write/read of the run directory by the driver and, on every node, a probe task that reads a token
back from the object store, opens the parent and writes/reads its scratch directory; any failure is one
`PuzzleError` line. Then `check_fits`: every job's request fits some node (else Ray would wait forever).
"""

import hashlib
import math
import os
import sys
import secrets
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator, Literal, Sequence, TypeVar

from puzzle.errors import PuzzleError
from puzzle.run_dir import check_reachable, describe
from puzzle.units import GIB

MAX_GPU_SHARE = 8  # at most this many jobs on one GPU, however small they are
PROBE_TIMEOUT_S = 120.0
Workers = int | Literal["auto"]
J = TypeVar("J")


# ---- connecting -------------------------------------------------------------------------------------


def named(address: str | None) -> bool:
    """Whether a cluster was named: an address, RAY_ADDRESS, or a Ray this process already joined (a process
    without Ray installed, e.g. a GPU image, has joined none: it runs every stage in-process)."""
    if address or os.environ.get("RAY_ADDRESS"):
        return True
    ray = sys.modules.get("ray")  # imported by whoever joined a cluster; never imported here just to ask
    return ray is not None and ray.is_initialized()


@contextmanager
def connected(address: str | None) -> Iterator[None]:
    """Ray joined for the block: `ray.init(address)` unless already initialised here (then left running)."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, ValueError, RuntimeError) as err:
            where = address or os.environ.get("RAY_ADDRESS") or "a new local Ray"
            raise PuzzleError(f"cannot reach the Ray cluster at {where}: {str(err).splitlines()[0]}") from None
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()


def parse_workers(workers: Workers | str) -> Workers:
    """`--workers` as given: a count (0: in this process) or "auto"."""
    if workers == "auto":
        return "auto"
    try:
        n = int(workers)
    except (TypeError, ValueError):
        raise PuzzleError(f"--workers takes a number or 'auto', got {workers!r}") from None
    if n < 0:
        raise PuzzleError("workers must not be negative")
    return n


def uses_ray(workers: Workers, ray: bool, address: str | None) -> bool:
    """Ray runs the jobs when allowed and either a cluster is named or several workers are asked for; one
    worker (or `auto` without a cluster) runs in this process, with no Ray to start."""
    if not ray or workers == 0:
        return False
    return named(address) or (workers != "auto" and workers > 1)


# ---- the cluster and what a job requests --------------------------------------------------------------


@dataclass(frozen=True)
class ClusterInfo:
    """The alive nodes' resources (Ray's names: CPU, GPU, memory) and one GPU's memory (None: unknown)."""

    nodes: tuple[dict[str, float], ...]
    gpu_bytes: float | None = None

    @property
    def cpus(self) -> float:
        return sum(n.get("CPU", 0.0) for n in self.nodes)

    @property
    def gpus(self) -> float:
        return sum(n.get("GPU", 0.0) for n in self.nodes)

    def summary(self) -> str:
        gpu = f" ({self.gpu_bytes / GIB:.0f} GiB each)" if self.gpus and self.gpu_bytes else ""
        return f"Ray: {len(self.nodes)} node(s), {self.cpus:g} CPUs, {self.gpus:g} GPUs{gpu}"


def cluster_info(gpu_bytes: float | None = None) -> ClusterInfo:
    import ray

    nodes = tuple(dict(n["Resources"]) for n in ray.nodes() if n.get("Alive"))
    return ClusterInfo(nodes, gpu_bytes)


def auto_workers(threads: int, info: ClusterInfo | None = None) -> int:
    """`--workers auto` on a cluster: one worker per GPU, or per `threads` CPUs on a CPU-only cluster."""
    info = info or cluster_info()
    if info.gpus >= 1:
        return int(info.gpus)
    return max(1, int(info.cpus // max(threads, 1)))


@dataclass(frozen=True)
class Resources:
    """One task's request, in Ray's units: CPUs, a (fractional) number of GPUs, memory in bytes."""

    num_cpus: float
    num_gpus: float = 0.0
    memory: int = 0

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory > 0:
            opts["memory"] = self.memory
        return opts

    def bundle(self) -> dict[str, float]:
        """The same request as a placement group bundle."""
        bundle = {"CPU": self.num_cpus, "GPU": self.num_gpus, "memory": float(self.memory)}
        return {k: v for k, v in bundle.items() if v > 0}

    def describe(self) -> str:
        return f"{self.num_cpus:g} CPU, {self.num_gpus:g} GPU, {self.memory / GIB:.1f} GiB"


def gpu_share(device_bytes: float, gpu_bytes: float | None) -> float:
    """The GPUs one job requests: 1/k where k such jobs fit in one GPU's memory (at most MAX_GPU_SHARE, to
    4 decimals as Ray counts), 1 when the GPU's memory is unknown or the job needs all of it."""
    if not gpu_bytes or device_bytes <= 0:
        return 1.0
    k = min(int(gpu_bytes // device_bytes), MAX_GPU_SHARE)
    return 1.0 if k <= 1 else math.floor(10_000 / k) / 10_000


def job_resources(host_bytes: float, device_bytes: float, threads: int, info: ClusterInfo, use_gpu: bool = True) -> Resources:
    """A job's request from its estimate: host bytes as Ray `memory`, its device bytes as a share of one GPU
    (on a cluster with GPUs, when the stage may use one), its threads as CPUs."""
    gpus = gpu_share(device_bytes, info.gpu_bytes) if use_gpu and info.gpus > 0 else 0.0
    return Resources(num_cpus=float(max(threads, 1)), num_gpus=gpus, memory=int(math.ceil(host_bytes)))


def check_fits(gangs: Sequence[Sequence[Resources]], info: ClusterInfo, what: str) -> None:
    """Every gang (the jobs placed together on one node) fits on some node, and no job needs more than one
    GPU's memory; else one line (Ray itself would wait for such a node forever)."""
    for gang in gangs:
        need: dict[str, float] = {}
        for r in gang:
            for k, v in r.bundle().items():
                need[k] = need.get(k, 0.0) + v
        if not any(all(node.get(k, 0.0) >= v for k, v in need.items()) for node in info.nodes):
            biggest = max(info.nodes, key=lambda n: n.get("memory", 0.0), default={})
            raise PuzzleError(
                f"a {what} job needs {need.get('CPU', 0):g} CPUs, {need.get('GPU', 0):g} GPUs and "
                f"{need.get('memory', 0) / GIB:.1f} GiB of memory on one node; the largest node has "
                f"{biggest.get('CPU', 0):g} CPUs, {biggest.get('GPU', 0):g} GPUs, {biggest.get('memory', 0) / GIB:.1f} GiB "
                "(use more workers, fewer threads or smaller batches)")


def placement(keys: Sequence[Hashable], requests: Sequence[Resources]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Per job, the scheduling options that keep jobs with the same key (a layer group) on one node: a
    STRICT_PACK placement group per key held by several jobs, one bundle per job; {} for a key with one job.
    Returns (options per job, the placement groups to remove when done)."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    members: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    options: list[dict[str, Any]] = [{} for _ in keys]
    groups = []
    for jobs in members.values():
        if len(jobs) < 2:
            continue
        pg = placement_group([requests[i].bundle() for i in jobs], strategy="STRICT_PACK")
        groups.append(pg)
        for bundle, i in enumerate(jobs):
            options[i] = {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle)}
    return options, groups


def remove_placement(groups: list[Any]) -> None:
    from ray.util.placement_group import remove_placement_group

    for pg in groups:
        remove_placement_group(pg)


# ---- inside a task ----------------------------------------------------------------------------------


def task_device() -> dict[str, Any]:
    """Where this Ray task runs: the device (`cuda` = the GPU Ray assigned, which CUDA_VISIBLE_DEVICES
    restricts the task to; `cpu` when none was assigned or torch sees none), Ray's GPU ids, the variable
    itself, host and pid. Recorded in each job's result."""
    import ray
    import torch

    ids = [str(i) for i in ray.get_gpu_ids()]
    return {"device": "cuda" if ids and torch.cuda.is_available() else "cpu", "gpu_ids": ids,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "host": socket.gethostname(),
            "pid": os.getpid()}


def ship(root: str | Path, rels: Sequence[str]) -> Any:
    """The files `rels` (paths relative to the run directory `root`) put into Ray's object store as one
    {rel: bytes} value; files that do not exist are left out."""
    import ray

    root = Path(root)
    return ray.put({rel: (root / rel).read_bytes() for rel in rels if (root / rel).is_file()})


def run_files(root: str | Path, directory: Path) -> list[str]:
    """Every file under `directory` (inside the run directory `root`), relative to `root`."""
    root = Path(root)
    return [p.relative_to(root).as_posix() for p in sorted(Path(directory).rglob("*")) if p.is_file()]


@contextmanager
def unpacked(*file_sets: dict[str, bytes]) -> Iterator[Path]:
    """A private temporary run directory holding the shipped files (later sets win); removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix="puzzle-job-"))
    try:
        for files in file_sets:
            for rel, data in files.items():
                path = work / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- the driver's loop ------------------------------------------------------------------------------


def stream(jobs: Sequence[J], submit: Callable[[J], Any], handle: Callable[[J, Any], None], max_retries: int,
           what: str, poll_s: float = 0.5) -> None:
    """Run generator tasks to the end: `submit(job)` starts one (an ObjectRefGenerator), `handle(job, item)`
    takes each item it yields, in order. A job whose worker died is submitted again (`submit` sees the
    driver's state, so it leaves out what was received), at most `max_retries` times; a `PuzzleError` raised
    in a worker is raised here as itself (one line); the other jobs are then cancelled."""
    import ray

    running = {submit(job): (job, 1) for job in jobs}
    try:
        _drain(running, submit, handle, max_retries, what, poll_s)
    finally:
        for gen in running:  # after an error: stop the other jobs (a cluster outlives this driver)
            try:
                ray.cancel(gen, force=True)
            except Exception:  # already finished, or a Ray without generator cancellation
                pass


def _drain(running: dict[Any, tuple[Any, int]], submit: Callable[[Any], Any], handle: Callable[[Any, Any], None],
           max_retries: int, what: str, poll_s: float) -> None:
    import ray
    from ray.exceptions import RayError, RayTaskError

    while running:
        ready, _ = ray.wait(list(running), num_returns=1, timeout=poll_s)
        for gen in ready:
            job, attempt = running[gen]
            try:
                item = ray.get(next(gen))
            except StopIteration:
                del running[gen]
                continue
            except RayTaskError as err:
                if isinstance(err.cause, PuzzleError):
                    raise err.cause from None
                raise
            except RayError as err:  # the worker died (killed, OOM, node lost): the job is submitted again
                del running[gen]
                if attempt > max_retries:
                    raise PuzzleError(f"a {what} worker died {attempt} times ({type(err).__name__}); "
                                      "rerun the same command to resume") from None
                running[submit(job)] = (job, attempt + 1)
                continue
            handle(job, item)


# ---- preflight --------------------------------------------------------------------------------------


def _gpu_bytes_here() -> float | None:
    """One GPU's memory on this node, from nvidia-smi (it ignores CUDA_VISIBLE_DEVICES); None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
        values = [float(v) for v in out.stdout.split()] if out.returncode == 0 else []
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    return min(values) * 2**20 if values else None  # MiB


def probe(token: bytes, parent: str) -> dict[str, Any]:
    """The preflight's task on one node: what a worker there can reach (see the module's docstring)."""
    problems = []
    path = Path(parent)
    readable = path / "config.json" if path.is_dir() else path
    if not (readable.is_file() and os.access(readable, os.R_OK)):
        problems.append(f"cannot read the parent {readable}")
    with unpacked({"probe": token}) as work:
        if (work / "probe").read_bytes() != token:
            problems.append(f"its scratch directory {work.parent} gives back other bytes than written")
    return {"host": socket.gethostname(), "token": hashlib.sha256(token).hexdigest(), "problems": problems,
            "gpu_bytes": _gpu_bytes_here()}


def preflight(run_dir: str | Path, parent: str | Path) -> ClusterInfo:
    """Check what a fanned-out stage needs and print the one line saying which mode is in force (Ray must be
    connected). Raises a one-line `PuzzleError` when the run directory, a node, its object store or the
    parent is out of reach."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError, RayTaskError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    check_reachable(run_dir)
    token = secrets.token_bytes(32)
    expected = hashlib.sha256(token).hexdigest()
    ref = ray.put(token)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    task = ray.remote(probe)
    refs = [task.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(ref, str(parent)) for n in nodes]
    try:
        answers = ray.get(refs, timeout=PROBE_TIMEOUT_S)
    except GetTimeoutError:
        raise PuzzleError(f"Ray workers did not answer the preflight within {PROBE_TIMEOUT_S:.0f} s") from None
    except RayTaskError as err:
        raise PuzzleError(f"a Ray worker cannot run puzzle (is it installed on every node?): "
                          f"{str(err.cause).splitlines()[0] if err.cause else err}") from None
    except RayError as err:
        raise PuzzleError(f"the preflight's probe task failed: {type(err).__name__}") from None
    for answer in answers:
        problems = answer["problems"] + ([] if answer["token"] == expected else ["its object store gave back other bytes"])
        if problems:
            raise PuzzleError(f"a worker on {answer['host']} {'; '.join(problems)}; "
                              "every node needs the parent at the same path")
    gpus = [a["gpu_bytes"] for a in answers if a["gpu_bytes"]]
    info = cluster_info(min(gpus) if gpus else None)
    print(f"{describe(run_dir)}; {info.summary()}; workers get inputs and return results through Ray's "
          "object store", flush=True)
    return info
