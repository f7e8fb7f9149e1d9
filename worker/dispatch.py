"""advance(job): read the committed markers, ask the reconciler, enqueue what is ready (idempotent).

Sending the same task twice is harmless (the second run skips); dedup marks in Redis keep it rare: a task
is not sent while it is marked queued or running. The marks are only an optimisation: flushing Redis
loses them, and `resume` (advance) sends whatever is ready and not committed again.
"""

from __future__ import annotations

import json
import os
import time
import tempfile
from pathlib import Path

from tlq_farm import plan, steps
from tlq_farm.store import Store, open_store

from worker.cache import CachedStore
from worker.probe import parse_size
from worker.app import (HEARTBEAT_S, JOBS_KEY, REQUEUE_AFTER, affinity_key, app, mark_id, personal_queue,
                        queued_key, redis_client, running_key)

RUN_TASK = "tlq.run"
ADVANCE_TASK = "tlq.advance"

_stores: dict[str, Store] = {}
# Manifests and groups never change once committed (same job id, same content): read each once.
_plan_cache: dict = {}


def store_for(url: str) -> Store:
    """One Store per URL per process; S3 stores read through a local cache of TLQ_CACHE_BYTES (default 2g,
    0 for none) in TLQ_CACHE_DIR, so what this worker wrote or read is not downloaded again."""
    if url not in _stores:
        store = open_store(url)
        cache_bytes = parse_size(os.environ.get("TLQ_CACHE_BYTES", "2g"))
        if url.startswith("s3://") and cache_bytes:
            folder = os.environ.get("TLQ_CACHE_DIR") or Path(tempfile.gettempdir()) / "tlq-farm-cache"
            store = CachedStore(store, folder, cache_bytes)
        _stores[url] = store
    return _stores[url]


def advance(store_url: str, job: str, store: Store | None = None, idle_worker: str | None = None) -> dict:
    """Enqueue the ready, uncommitted, not already queued or running tasks of `job` -> a summary.

    idle_worker: the calling worker, which is about to be idle whatever its last heartbeat says."""
    store = store or store_for(store_url)
    r = redis_client()
    if steps.is_cancelled(store, job):
        r.hdel(JOBS_KEY, active_field(store_url, job))
        return {"job": job, "state": "cancelled", "sent": 0}
    manifest, committed, groups, rec = steps.reconcile_job(store, job, cache=_plan_cache)
    if rec.done:
        r.hdel(JOBS_KEY, active_field(store_url, job))
        return {"job": job, "state": "done", "sent": 0}
    r.hset(JOBS_KEY, active_field(store_url, job), "1")
    live = {w["id"]: w for w in workers() if time.time() - w.get("last_seen", 0) < 3 * HEARTBEAT_S + 1}
    if idle_worker in live:
        live[idle_worker] = dict(live[idle_worker], task=None)
    sent = []
    for task in rec.ready:
        task_id = task.task_id(job)
        mark = mark_id(store_url, task_id)
        if r.exists(running_key(mark)):
            continue
        if not r.set(queued_key(mark), "1", nx=True, ex=REQUEUE_AFTER):
            continue
        need = plan.memory_class(plan.estimate_memory(task, manifest, groups))
        queue = plan.queue_name(need)
        preferred = affine_worker(r, store_url, job, task, need, live)
        if preferred:
            live[preferred] = dict(live[preferred], task=task_id)  # one task per worker and advance
            # Short mark: if that worker does not take it soon, the next advance sends it to its class queue.
            r.set(queued_key(mark), "1", ex=AFFINITY_WAIT_S)
            queue = personal_queue(preferred)
        app.send_task(RUN_TASK, args=[store_url, job, task.to_dict()], task_id=task_id, queue=queue)
        sent.append(task.name)
    return {"job": job, "state": "running", "sent": len(sent), "ready": len(rec.ready), "missing": rec.missing}


# Kinds that read a shard's activations: sent to the worker that wrote them when it is idle.
AFFINE_KINDS = ("weights", "stats", "propagate")
AFFINITY_WAIT_S = 10


def affine_worker(r, store_url: str, job: str, task, need: int, live: dict) -> str | None:
    """The live, idle worker that wrote this task's shard last, if its memory class fits the task."""
    if task.kind not in AFFINE_KINDS or task.shard is None:
        return None
    owner = r.get(affinity_key(store_url, job, task.shard))
    w = live.get(owner.decode()) if owner else None
    if not w or w.get("task") or (w.get("class_bytes") or 0) < need:
        return None
    return w["id"]


def advance_active_jobs() -> None:
    """advance() every job Redis lists as active (what a worker's heartbeat does now and then)."""
    r = redis_client()
    for field in r.hkeys(JOBS_KEY):
        url, _, job = field.decode().rpartition("\n")
        advance(url, job)


def active_field(store_url: str, job: str) -> str:
    """Field of the active-jobs hash: store URL and job id (a job id is unique only within its store)."""
    return f"{store_url}\n{job}"


def workers() -> list[dict]:
    """Heartbeat records of the workers, newest first."""
    from worker.app import WORKERS_KEY

    out = [json.loads(v) for v in redis_client().hgetall(WORKERS_KEY).values()]
    return sorted(out, key=lambda w: -w.get("last_seen", 0))
