"""A persistent pool of gloo ranks per world size for the layout fuzzer: spawned once, fed one case
at a time through queues, so an example costs a few steps rather than a process start.

Every rank's process group has a short timeout, and the parent waits a bounded time for each
result: a hang fails the example (and the pool is restarted) instead of blocking the run.
"""
from __future__ import annotations

import datetime
import os
import queue

import torch.multiprocessing as mp

from moga_dist.testing import free_port

GLOO_TIMEOUT_S = int(os.environ.get("MOGA_FUZZ_GLOO_TIMEOUT", "30"))
RESULT_TIMEOUT_S = 120


def _serve(rank: int, world: int, port: int, inbox, outbox) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    import torch
    import torch.distributed as dist

    from moga_dist.layout_fuzz import groups_of, run_rank

    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=GLOO_TIMEOUT_S)       # new_group's default would be 30 min
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timeout)
    grids = {}
    for sub in range(2, world + 1):         # cases of a smaller world run on ranks 0 .. sub-1
        for tp in (t for t in range(1, sub + 1) if sub % t == 0):
            mine = {}                       # every rank creates every group, in the same order
            for key, lists in zip(("tp", "dp"), groups_of(sub, tp)):
                for ranks in lists:
                    g = dist.new_group(ranks, timeout=timeout) if len(ranks) > 1 else None
                    if rank in ranks and g is not None:
                        mine[key] = g
            grids[sub, tp] = mine
    outbox.put((rank, "ready"))
    while True:
        case = inbox.get()
        if case is None:
            break
        outbox.put((rank, run_rank(rank, case, grids[case.world, case.tp])))
    # No destroy_process_group: its teardown waits on peers; the pool's end is the process's.
    outbox.close()
    outbox.join_thread()
    os._exit(0)


class Pool:
    """`world` ranks waiting for cases of world <= `world`; `run(case)` returns the result dicts."""

    def __init__(self, world: int):
        ctx = mp.get_context("spawn")
        self.world = world
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(world)]
        port = free_port()
        self.procs = [ctx.Process(target=_serve, args=(r, world, port, self.inboxes[r], self.outbox), daemon=True)
                      for r in range(world)]
        for p in self.procs:
            p.start()
        self._collect("start", world, timeout=300)

    def _collect(self, what: str, n: int, timeout: float) -> list:
        got: dict[int, object] = {}
        while len(got) < n:
            try:
                rank, result = self.outbox.get(timeout=timeout)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                self.close()
                raise AssertionError(f"{what}: ranks {sorted(set(range(n)) - set(got))} gave no result within "
                                     f"{timeout} s (dead: {dead}): a hang or a crash") from None
            got[rank] = result
        return [got[r] for r in range(n)]

    def run(self, case) -> list[dict]:
        """Every rank's result of `case` (run on ranks 0 .. case.world - 1). A rank that reports
        an error may have left a collective half-done: the pool is closed (`alive` turns False)."""
        for box in self.inboxes[:case.world]:
            box.put(case)
        results = self._collect(f"case {case}", case.world, RESULT_TIMEOUT_S)
        if any(r["error"] for r in results):
            self.close()
        return results

    def close(self) -> None:
        for box in self.inboxes:
            box.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        self.procs = []

    @property
    def alive(self) -> bool:
        return bool(self.procs) and all(p.is_alive() for p in self.procs)
