"""Multi-node launch: two torchrun agents, one c10d rendezvous, one training job.

A multi-node job is one torchrun agent per machine, all given the same ``--rdzv-endpoint`` and
``--rdzv-id``; the agents meet there, agree on node ranks, and start their workers as one world.
Here both "nodes" are agents on this host, talking over loopback, which exercises the same code
path as separate machines: nothing in titan knows about nodes, it only sees RANK / WORLD_SIZE.

The job is HSDP 2 x 2, which titan refuses unless the world really has 4 ranks, so a pass means
the two agents joined one world (two separate worlds of 2 would exit with code 2). Per-step losses
must equal the single-process run (``reference_losses`` in conftest.py: FAST settings, global
batch 8, one process), and only the agent holding rank 0 writes a dump folder.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from helpers import FAST, REPO, losses, read_metrics

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

NNODES, NPROC_PER_NODE = 2, 2
GLOBAL = ["--training.global_batch_size", "8"]
HSDP_2X2 = [
    "--training.local_batch_size", "2",
    "--parallelism.data_parallel_replicate_degree", "2",
    "--parallelism.data_parallel_shard_degree", "2",
]  # fmt: skip
# A wedged job must fail the test, not hang it. A passing launch takes about 15 s on an idle
# 2-core machine and about 45 s while other jobs load it; the agents get 90 s in all. A node
# that never joins makes the other give up after JOIN_TIMEOUT_S, and a collective waiting for a
# dead rank gives up after the comm timeout, both well inside that.
AGENT_TIMEOUT_S = 90
JOIN_TIMEOUT_S = 45
COMM_TIMEOUTS = ["--comm.init_timeout_seconds", "45", "--comm.train_timeout_seconds", "45"]


def free_port() -> int:
    """A loopback port nobody listens on now (the OS picks it; a tiny race is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_cmd(endpoint: str, run_id: str, train_args: list[str]) -> list[str]:
    """One node's launcher: what each machine of a real job runs, with test-sized limits.

    --local-addr: the address this agent advertises; the rank-0 agent's becomes the workers'
    MASTER_ADDR. Left out it is the host's FQDN, which is right on a cluster but may not resolve
    in a sandbox, so the test pins it to loopback.
    --max-restarts 0: a failed worker fails the job at once instead of a new rendezvous round.
    --rdzv-conf join_timeout: how long an agent waits for the other node before giving up
    (default 600 s).
    No --node-rank: the c10d rendezvous assigns node ranks in order of arrival; --node-rank is
    only read by the static backend.
    """
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", str(NNODES),
        "--nproc-per-node", str(NPROC_PER_NODE),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", endpoint,
        "--rdzv-id", run_id,
        "--rdzv-conf", f"join_timeout={JOIN_TIMEOUT_S}",
        "--local-addr", "127.0.0.1",
        "--max-restarts", "0",
        "-m", "titan_core.train", *train_args,
    ]  # fmt: skip


def _workers(pid: int) -> dict[int, bytes]:
    """The agent's child processes (its workers) from /proc, pid -> command line."""
    found: dict[int, bytes] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            for child in map(int, (task / "children").read_text().split()):
                found[child] = Path(f"/proc/{child}/cmdline").read_bytes()
    return found


def _stop(agent: subprocess.Popen) -> None:
    """End an agent and its workers: SIGTERM (torchrun forwards it to its workers), then KILL.

    torchrun starts each worker in its own session, so killing a stuck agent alone would orphan
    them; those are killed by pid, and only while the pid still runs the same command line.
    """
    if agent.poll() is not None:
        return
    workers = _workers(agent.pid)
    agent.terminate()
    try:
        agent.wait(timeout=20)
        return
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait()
    for pid, cmdline in workers.items():
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline:
                os.kill(pid, signal.SIGKILL)


def _tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no output)"


def run_agents(tmp_path: Path, per_node_args: list[list[str]]) -> list[int]:
    """Start one agent per entry concurrently, wait for all; returns their exit codes.

    Both agents log to files (pipes could fill and block them). When one agent fails the others
    are stopped at once, and whatever is still running at the deadline is stopped too.
    """
    endpoint = f"127.0.0.1:{free_port()}"
    run_id = f"titan-test-{uuid.uuid4().hex[:12]}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    agents: list[subprocess.Popen] = []
    try:
        for node, args in enumerate(per_node_args):
            with (
                open(tmp_path / f"agent{node}.out", "wb") as out,
                open(tmp_path / f"agent{node}.err", "wb") as err,
            ):
                cmd = agent_cmd(endpoint, run_id, args)
                agents.append(subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO))
        deadline = time.monotonic() + AGENT_TIMEOUT_S
        while time.monotonic() < deadline:
            codes = [a.poll() for a in agents]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.2)
    finally:
        for agent in agents:
            _stop(agent)
    return [a.returncode for a in agents]


def agent_logs(tmp_path: Path, nodes: int = NNODES) -> str:
    return "\n".join(
        f"--- agent {n} stderr (tail) ---\n{_tail(tmp_path / f'agent{n}.err')}"
        for n in range(nodes)
    )


def test_two_torchrun_agents_train_like_one_process(tmp_path, reference_losses):
    # Each "node" gets its own dump folder, as if each had only a local disk: exactly one of them
    # (the node holding rank 0) may be written.
    dumps = [tmp_path / f"node{n}-dump" for n in range(NNODES)]
    args = [[*FAST, *GLOBAL, *HSDP_2X2, *COMM_TIMEOUTS, "--job.dump_folder", str(d)] for d in dumps]
    codes = run_agents(tmp_path, args)
    assert codes == [0] * NNODES, f"agent exit codes {codes}\n{agent_logs(tmp_path)}"

    written = [d for d in dumps if d.exists()]
    assert len(written) == 1, f"dump folders written: {written}"
    dump = written[0]
    assert not (dump / "previous-runs").exists()  # nobody else prepared this folder first
    assert [m["step"] for m in read_metrics(dump)] == list(range(1, 9))
    assert losses(dump) == pytest.approx(reference_losses, rel=1e-5, abs=0)

    # Exactly one rank in the whole job logs steps, and it is on the node that wrote the folder.
    errs = [(tmp_path / f"agent{n}.err").read_text() for n in range(NNODES)]
    assert [e.count("step 1/8 ") for e in errs] == [int(d == dump) for d in dumps]
