"""Spawning real multi-process runs over loopback for the tests.

``run_ranks("name", n)`` starts ``n`` processes of ``tests/worker.py name`` with the
launcher's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1,
a free MASTER_PORT), waits for all of them under a hard timeout (killing every one it started
when it expires), and returns each rank's exit code, output, and the JSON the worker reported.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORKER = HERE / "worker.py"
REPO = HERE.parent.parent


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankResult:
    """What one rank did."""

    rank: int
    rc: int | None
    out: str
    err: str
    report: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f"--- rank {self.rank} rc={self.rc}\nstdout:\n{self.out[-4000:]}\nstderr:\n{self.err[-6000:]}"


def require_cuda() -> None:
    """Skip the calling test, saying why, unless torch sees a CUDA device; with
    DEVCCL_REQUIRE_CUDA=1 (set on GPU machines) fail instead, so a broken CUDA setup cannot
    pass as skipped."""
    import pytest
    import torch

    if torch.cuda.is_available():
        return
    why = f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__})"
    if os.environ.get("DEVCCL_REQUIRE_CUDA", "").strip() == "1":
        pytest.fail(f"DEVCCL_REQUIRE_CUDA=1 but {why}")
    pytest.skip(f"{why}; set DEVCCL_REQUIRE_CUDA=1 to make this a failure")


class RunFailed(AssertionError):
    """A rank failed or the run timed out."""


def _env(rank: int, n: int, port: int, extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    for k in list(env):
        if k.startswith(("DEVCCL_", "TORCHELASTIC_")) or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            del env[k]
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(n),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(n),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PYTHONFAULTHANDLER="1",
        # A hang becomes an error naming the peer instead of blocking the suite.
        DEVCCL_TIMEOUT="30",
        DEVCCL_INIT_TIMEOUT="30",
        GLOO_SOCKET_IFNAME="lo",
        PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    env.update(extra or {})
    return env


def run_ranks(
    scenario: str,
    n: int,
    *,
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 90.0,
    check: bool = True,
) -> list[RankResult]:
    """Run ``worker.py scenario *args`` on ``n`` ranks; with ``check``, raise unless every
    rank exited 0 in time."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="devccl-test-") as tmp:
        procs = []
        files = []
        for r in range(n):
            out = open(Path(tmp) / f"{r}.out", "w+")  # noqa: SIM115 - closed below
            err = open(Path(tmp) / f"{r}.err", "w+")  # noqa: SIM115
            files.append((out, err))
            report = Path(tmp) / f"{r}.json"
            cmd = [sys.executable, str(WORKER), scenario, str(report), *(args or [])]
            procs.append(subprocess.Popen(cmd, env=_env(r, n, port, env), stdout=out, stderr=err, cwd=REPO))
        deadline = time.monotonic() + timeout
        timed_out = False
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        if timed_out:
            for p in procs:  # every process this run started, by handle
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
        results = []
        for r, (p, (out, err)) in enumerate(zip(procs, files, strict=True)):
            out.seek(0)
            err.seek(0)
            rep = Path(tmp) / f"{r}.json"
            report = json.loads(rep.read_text()) if rep.exists() else {}
            results.append(RankResult(r, p.returncode, out.read(), err.read(), report))
            out.close()
            err.close()
    if timed_out:
        raise RunFailed(f"{scenario} {args or ''} on {n} ranks timed out after {timeout}s\n" + "\n".join(x.describe() for x in results))
    if check and any(x.rc != 0 for x in results):
        raise RunFailed(f"{scenario} {args or ''} on {n} ranks failed\n" + "\n".join(x.describe() for x in results))
    return results
