"""A local Ray head for the tests and benchmarks that need a real cluster address (`ray start --head`), as
opposed to the embedded Ray that `ray.init()` starts in-process.

The head runs as `ray start --head --block` in its own session: on SIGTERM it stops what it started, so
leaving never calls `ray stop` (which would stop every Ray on the machine). It binds 127.0.0.1 on free ports
and keeps its files under a short temporary directory (Ray's unix socket paths must stay short). It runs in
this process's environment (tests/conftest.py sets the session's Ray auth token before anything imports
ray, so the head admits this process and nobody else) with the venv's bin first on PATH, so that a job
submitted to it finds the `puzzle` console script.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

RAY_BIN = Path(sys.executable).parent / "ray"
START_TIMEOUT_S = 600.0  # a hang, not a busy machine (a head takes seconds idle, minutes loaded)


@dataclass(frozen=True)
class LocalHead:
    address: str  # "127.0.0.1:PORT", the GCS: `ray.init(address=...)`, `ray status --address`
    dashboard: str | None  # "http://127.0.0.1:PORT" where the dashboard runs: `ray job submit --address`
    env: dict[str, str]  # the environment the head runs in; `ray` commands against it use it too


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free on 127.0.0.1 now (held open together, so no two are the same)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@contextlib.contextmanager
def local_head(num_cpus: int, num_gpus: int | None = None, object_store_bytes: int = 100 * 2**20,
               dashboard: bool = False) -> Iterator[LocalHead]:
    """A Ray head with `num_cpus` CPUs (and `num_gpus` declared GPUs, None: the ones Ray detects), up and
    answering when the block starts, stopped when it ends. `dashboard`: run the dashboard too (what
    `ray job submit` talks to); the head counts as up once it answers `ray job list`, else `ray status`."""
    gcs, client, agent, dashboard_port = free_ports(4)
    ray_tmp = tempfile.mkdtemp(prefix="pzr", dir="/tmp")
    env = {**os.environ, "PATH": f"{RAY_BIN.parent}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(RAY_BIN), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
           "--num-cpus", str(num_cpus), "--object-store-memory", str(object_store_bytes),
           "--temp-dir", ray_tmp, "--disable-usage-stats"]
    if num_gpus is not None:
        cmd += ["--num-gpus", str(num_gpus)]
    if dashboard:
        cmd += ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port)]
    else:
        cmd += ["--include-dashboard", "false"]
    head = LocalHead(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard_port}" if dashboard else None, env)
    ready = ["job", "list", "--address", head.dashboard] if dashboard else ["status", "--address", head.address]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        # ask from a subprocess until the head answers: a failed ray.init here would linger in this process
        while subprocess.run([str(RAY_BIN), *ready], env=env, capture_output=True).returncode:
            if proc.poll() is not None:
                raise RuntimeError("ray start --head exited")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not come up in {START_TIMEOUT_S:.0f} s")
            time.sleep(1)
        yield head
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
