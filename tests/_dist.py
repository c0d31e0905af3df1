"""Run a function in N gloo processes on CPU and collect what each rank returns.

Usage in a test::

    results = run_distributed(my_fn, world_size=2, args=(...,))   # list indexed by rank

``my_fn(rank, world_size, *args)`` must be a module-level function (it is pickled to the workers).

The workers form a shared pool per world size: they are spawned and join a process group once per
test session and then run one job after another (spawning and initialising gloo costs seconds, and
the suite runs dozens of multi-process jobs). A job that fails, times out or tears the process group
down (Lightning's DDP teardown may) retires that pool; the next job gets a fresh one.
"""

from __future__ import annotations

import atexit
import os
import queue as queue_mod
import socket
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, jobs, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    while True:
        job = jobs.get()
        if job is None:
            break
        fn, args = job
        try:
            results.put((rank, "ok", fn(rank, world_size, *args), dist.is_initialized()))
        except BaseException:  # report to the parent instead of hanging it
            results.put((rank, "error", traceback.format_exc(), False))
            break
        if not dist.is_initialized():  # the job destroyed the group: this pool is spent
            break
    if dist.is_initialized():
        dist.destroy_process_group()


class _Pool:
    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.jobs = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        port = _free_port()
        # not daemonic: a job may start DataLoader workers; atexit closes the pool
        self.procs = [ctx.Process(target=_worker, args=(r, world_size, port, self.jobs[r], self.results))
                      for r in range(world_size)]
        for p in self.procs:
            p.start()
        self.alive = True

    def run(self, fn, args: tuple, timeout: float) -> list:
        for q in self.jobs:
            q.put((fn, args))
        results: dict[int, object] = {}
        errors = []
        try:
            for _ in range(self.world_size):
                rank, status, payload, keeps_group = self.results.get(timeout=timeout)
                if status == "error":
                    errors.append(f"rank {rank}:\n{payload}")
                if not keeps_group:
                    self.alive = False
                results[rank] = payload
        except queue_mod.Empty:
            self.alive = False
            errors.append(f"timed out after {timeout} s waiting for {self.world_size - len(results)} rank(s)")
        if errors:
            self.alive = False
            raise AssertionError("distributed worker failed:\n" + "\n".join(errors))
        return [results[r] for r in range(self.world_size)]

    def close(self) -> None:
        for q in self.jobs:
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
        self.alive = False


_POOLS: dict[int, _Pool] = {}


def run_distributed(fn, world_size: int = 2, args: tuple = (), timeout: float = 600.0) -> list:
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive or not all(p.is_alive() for p in pool.procs):
        if pool is not None:
            pool.close()
        pool = _POOLS[world_size] = _Pool(world_size)
    try:
        return pool.run(fn, args, timeout)
    finally:
        if not pool.alive:
            pool.close()
            _POOLS.pop(world_size, None)


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
