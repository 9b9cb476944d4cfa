"""Run many checks in ONE spawn of real torch.distributed (gloo) processes.

Spawning and importing (megatron-core especially) costs seconds per process, so a test module
collects its multi-process checks and runs them all in one process group:

    results = run_checks(world_size=2, checks=[check_a, check_b])
    assert results["check_a"] == []          # a list of per-rank failure tracebacks

A check is a module-level function `check(rank: int, world_size: int, workdir: Path) -> None`
that raises on failure. Collectives time out (`timeout_s`) instead of hanging when a peer fails.
"""
from __future__ import annotations

import datetime
import os
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch.multiprocessing as mp

Check = Callable[[int, int, Path], None]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, checks: list[Check], workdir: str, timeout_s: float, queue,
            backend: str = "gloo") -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        for check in checks:
            try:
                check(rank, world_size, Path(workdir))
                queue.put((check.__name__, rank, None))
            except Exception:  # reported to the parent, which fails the test that owns the check
                queue.put((check.__name__, rank, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_checks(world_size: int, checks: list[Check], workdir: Path, timeout_s: float = 120.0,
               backend: str = "gloo", collective_timeout_s: float | None = None) -> dict[str, list[str]]:
    """Run `checks` on `world_size` ranks (gloo; "nccl": one GPU per rank); returns check name -> failure
    tracebacks (empty: passed). Collectives time out after `collective_timeout_s` (default `timeout_s`)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, checks, str(workdir),
                                          collective_timeout_s or timeout_s, queue, backend))
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[str, list[str]] = {check.__name__: [] for check in checks}
    seen: dict[str, set[int]] = {check.__name__: set() for check in checks}
    expected = world_size * len(checks)
    received = 0
    deadline = time.monotonic() + timeout_s * (len(checks) + 1)
    crashed_at = None
    reported = [0] * world_size
    while received < expected and time.monotonic() < deadline:
        try:
            name, rank, error = queue.get(timeout=1.0)
        except queue_module.Empty:
            # A rank that died outside a check (a segfault, a CUDA abort, NCCL failing to start) reports nothing
            # more, and its peers would wait out a collective timeout in each check left: stop waiting soon after
            # (its last reports may still be on their way), and say which ranks never reported.
            if any(p.exitcode not in (None, 0) and reported[r] < len(checks) for r, p in enumerate(procs)):
                crashed_at = crashed_at or time.monotonic()
                if time.monotonic() - crashed_at > 10:
                    for proc in procs:  # the others wait on it in a collective: no use waiting for them
                        proc.kill()
                    break
            elif all(p.exitcode is not None for p in procs):
                break
            continue
        received += 1
        reported[rank] += 1
        seen[name].add(rank)
        if error:
            results[name].append(f"rank {rank}:\n{error}")
    for proc in procs:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    for name, ranks in seen.items():
        missing = sorted(set(range(world_size)) - ranks)
        if missing:
            codes = [p.exitcode for p in procs]
            results[name].append(f"ranks {missing} never reported (process exit codes {codes})")
    return results
