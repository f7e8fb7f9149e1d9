"""`tlq-farm run --workers N` without a broker: N local processes share one job through its store.

Each process runs the same reconcile loop as the embedded run; a claim folder makes each ready task go to
one process. The results do not depend on which process computed what, so the export has the same bytes
as a one-process run.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile


def _pool_worker(store_url: str, job: str, device: str, claims: str, threads: int, index: int) -> None:
    import torch

    from tlq_farm.steps import run_embedded
    from tlq_farm.store import open_store

    torch.set_num_threads(threads)
    try:
        run_embedded(open_store(store_url), job, device=device, claims=claims,
                     worker={"worker": f"local-{index}"}, progress=index == 0)
    except KeyboardInterrupt:  # the coordinator says how to go on; a traceback per process would bury that
        raise SystemExit(130) from None


def _stop(procs, grace_s: float = 10.0) -> None:
    """Stop the local workers after a Ctrl-C: each is interrupted (so it removes its partial writes) before
    the claim folder goes; what they committed stays."""
    import os
    import signal
    import time

    end = time.monotonic() + grace_s
    for p in procs:  # a Ctrl-C at a terminal reached them too; give them a moment to stop on their own
        p.join(max(0.0, min(2.0, end - time.monotonic())))
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGINT)
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
        if p.is_alive():
            p.terminate()
            p.join()


def run_pool(store_url: str, job: str, *, workers: int, device: str = "cpu", threads: int = 1) -> None:
    """Run the job in `workers` local processes; raise RuntimeError if any of them failed."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="tlq-claims-") as claims:
        procs = [ctx.Process(target=_pool_worker, args=(store_url, job, device, claims, threads, i), daemon=False)
                 for i in range(workers)]
        for p in procs:
            p.start()
        try:
            for p in procs:
                p.join()
        except KeyboardInterrupt:
            _stop(procs)
            raise
    failed = [i for i, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"local worker(s) {failed} of job {job} exited with an error (see above); "
                           f"the finished tasks are kept: run `tlq-farm resume {job}` to finish the job")
