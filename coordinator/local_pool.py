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
    run_embedded(open_store(store_url), job, device=device, claims=claims,
                 worker={"worker": f"local-{index}"}, progress=index == 0)


def run_pool(store_url: str, job: str, *, workers: int, device: str = "cpu", threads: int = 1) -> None:
    """Run the job in `workers` local processes; raise RuntimeError if any of them failed."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="tlq-claims-") as claims:
        procs = [ctx.Process(target=_pool_worker, args=(store_url, job, device, claims, threads, i), daemon=False)
                 for i in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    failed = [i for i, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"local worker(s) {failed} of job {job} exited with an error (see above); "
                           f"the finished tasks are kept: run `tlq-farm resume {job}` to finish the job")
