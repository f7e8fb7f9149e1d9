"""Celery tasks: thin wrappers around tlq_farm.steps (run one task) and dispatch.advance.

Fault injection for tests: TLQ_FAULT_CRASH_TAKEN="<task name>" exits the worker (as a kill would) right
after it took that task's message and before it marks the task running, once per TLQ_FAULT_CRASH_FLAG file.
"""

from __future__ import annotations

import logging

from kombu.exceptions import OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tlq_farm import plan, steps
from tlq_farm.plan import Task
from tlq_farm.store import StoreUnavailable

from worker import dispatch
from worker.app import STATE, affinity_key, app, mark_id, queued_key, redis_client, running_key, store_refusal

RETRIED = (StoreUnavailable, OperationalError, RedisConnectionError, RedisTimeoutError)
log = logging.getLogger("tlq_farm.worker")
RETRY = dict(autoretry_for=RETRIED, retry_backoff=2, retry_backoff_max=120, retry_jitter=True, max_retries=30)


@app.task(name=dispatch.RUN_TASK, **RETRY)
def run_task(store_url: str, job: str, task: dict) -> str:
    """Run one farm task (cancel check, skip if committed, compute, commit), then advance the job."""
    refusal = store_refusal(store_url)
    if refusal:
        log.warning("refused task %s of job %s: %s", task.get("kind"), job, refusal)
        return "refused"
    t = Task.from_dict(task)
    steps.fault_crash(t.name, "TLQ_FAULT_CRASH_TAKEN")
    mark = mark_id(store_url, t.task_id(job))
    r = redis_client()
    STATE.current = mark
    # The heartbeat record says busy from now on, not from the next beat: an advance in between would send
    # this worker the tasks whose shards it holds (dispatch.affine_worker) and leave them waiting behind this one.
    STATE.beat()
    r.delete(queued_key(mark))
    store = dispatch.store_for(store_url)
    try:
        status = steps.execute(store, job, t, device=STATE.info.get("device", "cpu"),
                               worker={"worker": STATE.id, "class_bytes": STATE.info.get("class_bytes")})
    finally:
        STATE.current = None
        r.delete(running_key(mark))
        # And idle as soon as it is: until its next beat other workers' advances would take it for busy and
        # send the tasks whose shards it holds elsewhere (to a busy worker, where they wait).
        STATE.beat()
    if status in ("computed", "skipped"):
        ctx = steps.job_context(store, job)
        dispatch.note_committed(r, store_url, job, ctx.outputs(t))
        if status == "computed":  # the shards it read or wrote are in this worker's cache now
            for k in plan.task_shards(t, ctx.manifest, ctx.groups if t.kind not in ("embed", "groups") else None):
                r.set(affinity_key(store_url, job, k), STATE.id, ex=24 * 3600)
    # What this task made ready; on anything but a fresh commit (a skip, a missing input) the full reconcile.
    dispatch.advance(store_url, job, store, idle_worker=STATE.id, finished=t if status == "computed" else None)
    return status


@app.task(name=dispatch.ADVANCE_TASK, **RETRY)
def advance(store_url: str, job: str) -> dict:
    refusal = store_refusal(store_url)
    if refusal:
        log.warning("refused to advance job %s: %s", job, refusal)
        return {"job": job, "state": "refused", "sent": 0}
    return dispatch.advance(store_url, job)
