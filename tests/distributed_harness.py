"""Running a test's worker on several processes (gloo, loopback) under a watchdog.

:func:`run_ranks` spawns ``world`` processes that join one gloo process group on
127.0.0.1 and each call ``worker(rank, world, **kwargs)``; it returns their results in rank
order. A hang fails fast twice over: the group's collectives time out after
``collective_timeout`` seconds (a rank waiting in an all-reduce or all-to-all that another
rank never issues raises there), and the whole run is killed after ``timeout`` seconds.
A rank that raises, dies or hangs makes :func:`run_ranks` raise :class:`RanksFailed` naming
it and what it printed.

Workers return plain data (numbers, lists, numpy arrays): tensors are turned into numpy
arrays so nothing is shared between processes after they end.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable

import torch


class RanksFailed(AssertionError):
    """A rank raised, died or did not finish in time (``hung``: the last)."""

    def __init__(self, message: str, hung: bool) -> None:
        super().__init__(message)
        self.hung = hung


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def to_plain(value: Any) -> Any:
    """Tensors (also inside lists, tuples and dicts) as numpy arrays."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(v) for v in value)
    return value


def _entry(worker: Callable[..., Any], rank: int, world: int, port: int, collective_timeout: float, results: Any,
           kwargs: dict[str, Any]) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # diffusers' enable_parallelism picks a device per rank as ``rank % torch.accelerator.device_count()``,
    # which is 0 on a CPU-only machine: one CPU "device" here (the mesh is gloo's on the CPU)
    torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=collective_timeout))
        out = worker(rank, world, **kwargs)
        results.put((rank, True, to_plain(out)))
    except BaseException:  # noqa: BLE001 - reported to the test, with the traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group: the process ends anyway
                pass


def run_ranks(worker: Callable[..., Any], world: int = 2, timeout: float = 240.0, collective_timeout: float = 20.0,
              **kwargs: Any) -> list[Any]:
    """``worker``'s results on ``world`` ranks (see module docstring)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(worker, r, world, port, collective_timeout, results, kwargs), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < world and time.monotonic() < deadline:
            try:
                rank, ok, payload = results.get(timeout=0.5)
                got[rank] = (ok, payload)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode not in (None, 0)]
                if dead:
                    time.sleep(1.0)  # its message may still be on its way
                    while not results.empty():
                        rank, ok, payload = results.get()
                        got[rank] = (ok, payload)
                    dead = [r for r in dead if r not in got]
                    if dead:
                        raise RanksFailed(f"ranks {dead} died (exit codes {[procs[r].exitcode for r in dead]})", hung=False)
    finally:
        for p in procs:
            p.join(timeout=5 if len(got) == world else 0.1)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    failed = {r: payload for r, (ok, payload) in got.items() if not ok}
    if failed:
        details = "\n".join(f"--- rank {r}:\n{tb}" for r, tb in sorted(failed.items()))
        hung = any("timed out" in tb.lower() or "timeout" in tb.lower() or "connection closed" in tb.lower()
                   for tb in failed.values())
        raise RanksFailed(f"ranks {sorted(failed)} raised:\n{details}", hung=hung)
    missing = [r for r in range(world) if r not in got]
    if missing:
        raise RanksFailed(f"ranks {missing} did not finish within {timeout:.0f} s (a hang)", hung=True)
    return [got[r][1] for r in range(world)]
