"""Run `trainer.run` in N real processes joined by a gloo process group on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any

import torch
import torch.multiprocessing as mp

from configs.schema import RunConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Interrupt(Exception):
    """Stands in for a crash."""


class CrashAt:
    """A sink that raises when the training report of `step` arrives (on every rank at once: reports follow
    a collective, so no rank is left waiting for the others)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def log(self, metrics: dict[str, float], step: int) -> None:
        if step == self.step and "loss" in metrics:
            raise Interrupt

    def on_checkpoint(self, step: int, url: str) -> None:
        pass


class SigtermAt:
    """A sink that sends SIGTERM to its own process when the training report of `step` arrives."""

    def __init__(self, step: int) -> None:
        self.step = step

    def log(self, metrics: dict[str, float], step: int) -> None:
        if step == self.step and "loss" in metrics:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_checkpoint(self, step: int, url: str) -> None:
        pass


def _worker(rank: int, world_size: int, port: int, cfg: RunConfig, crash_at: int | None,
            sigterm: tuple[int, int] | None, results: Any) -> None:
    import trainer
    from trainer.dist import init_distributed
    from trainer.preempt import Preempted

    # Two ranks on a 2-core machine: one thread each keeps them from fighting over the cores.
    torch.set_num_threads(1)
    ctx = init_distributed(rank=rank, local_rank=rank, world_size=world_size,
                           init_method=f"tcp://127.0.0.1:{port}")
    try:
        sinks: list[Any] = [] if crash_at is None else [CrashAt(crash_at)]
        if sigterm is not None and sigterm[0] == rank:
            sinks.append(SigtermAt(sigterm[1]))
        try:
            result = trainer.run(cfg, ctx, sinks)
        except Interrupt:
            result = None
        except Preempted as error:
            result = str(error)
        results.put((rank, result))
    finally:
        torch.distributed.destroy_process_group()
    # Leave without interpreter teardown. After an exception has unwound through a DeepSpeed engine, its
    # native threads were once torn down at exit with std::terminate (SIGABRT, 1 crash-resume run in ~10 on
    # CI); the result is already delivered, and a simulated crash is not what these tests examine.
    os._exit(0)


def run_ranks(cfg: RunConfig, world_size: int = 2, crash_at: int | None = None,
              sigterm: tuple[int, int] | None = None, timeout_s: float = 600) -> list[Any]:
    """The `TrainResult` of every rank in rank order (None for ranks stopped by `crash_at`, the message for
    ranks stopped by preemption after `sigterm=(rank, step)` sent SIGTERM to that rank at that step's
    report); raises if a rank failed otherwise, and `TimeoutError` (after killing them all) if the ranks
    have not all finished in `timeout_s`: a rank that died or hangs cannot hang the suite."""
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    processes = mp.start_processes(_worker, args=(world_size, free_port(), cfg, crash_at, sigterm, results),
                                   nprocs=world_size, start_method="spawn", join=False)
    deadline = time.monotonic() + timeout_s
    while not processes.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in processes.processes:
                process.kill()
            raise TimeoutError(f"{world_size} ranks did not finish within {timeout_s:.0f} s; killed")
    by_rank = dict(results.get() for _ in range(world_size))
    return [by_rank[rank] for rank in range(world_size)]
