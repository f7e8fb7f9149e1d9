"""advance(job): read the committed markers, ask the reconciler, enqueue what is ready (idempotent).

Sending the same task twice is harmless (the second run skips); dedup marks in Redis keep it rare: a task
is not sent while it is marked queued or running. The marks are only an optimisation: flushing Redis
loses them, and `resume` (advance) sends whatever is ready and not committed again.

A queued mark is trusted only while there is evidence that its task is somewhere: its message waits in a
queue a live worker consumes, or a worker took it moments ago (kombu's unacked index), or a live worker's
heartbeat renews its running mark. A worker killed between taking a message and starting the task leaves
none of these, so the next advance (every worker's heartbeat, `resume`, a following coordinator) sends
the task again instead of waiting for the mark's TTL.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

from tlq_farm import plan, steps
from tlq_farm.store import Store, keys, open_store

from worker.cache import CachedStore, cache_dir
from worker.probe import parse_size
from worker.app import (HEARTBEAT_S, JOBS_KEY, REQUEUE_AFTER, affinity_key, app, committed_full_key, committed_key,
                        commits_key, job_events_channel, mark_id, personal_queue, queued_key, redis_client,
                        running_key)

RUN_TASK = "tlq.run"
ADVANCE_TASK = "tlq.advance"

_stores: dict[str, Store] = {}
# The worker's cache when TLQ_CACHE_BYTES is not set: at least this, more where a job needs it.
DEFAULT_CACHE_BYTES = "2g"
# Manifests and groups never change once committed (same job id, same content): read each once.
_plan_cache: dict = {}


def store_for(url: str) -> Store:
    """One Store per URL per process; S3 stores read through a local cache (cache_dir: under TLQ_CACHE_DIR or
    ~/.cache/tlq-farm), so what this worker wrote or read is not downloaded again. Its size: TLQ_CACHE_BYTES
    (0 for none), else at least 2 GiB and as much as a job's blocks read again (plan.cache_bytes), as far as
    the disk has room."""
    if url not in _stores:
        store = open_store(url)
        size = os.environ.get("TLQ_CACHE_BYTES", "")
        cache_bytes = parse_size(size or DEFAULT_CACHE_BYTES)
        if url.startswith("s3://") and cache_bytes:
            store = CachedStore(store, cache_dir(os.environ), cache_bytes, grow=not size, known=KnownCommits(url))
        _stores[url] = store
    return _stores[url]


def advance(store_url: str, job: str, store: Store | None = None, idle_worker: str | None = None,
            finished: plan.Task | None = None) -> dict:
    """Enqueue the ready, uncommitted, not already queued or running tasks of `job` -> a summary.

    idle_worker: the calling worker, which is about to be idle whatever its last heartbeat says.
    finished: the task the caller just committed: only what it made ready is looked for (steps.ready_after,
    a few marker lookups instead of a listing of the whole job); every other advance (heartbeats, resume,
    the coordinator) reconciles in full, which finds anything this shortcut could miss."""
    store = store or store_for(store_url)
    r = redis_client()
    # After a task, the cancel flag was looked up as that task began: a cancel since then stops the next
    # task as it begins, and that task's advance (a full one) ends the job here.
    if finished is None and steps.is_cancelled(store, job):
        _ended(r, store_url, job, "cancelled")
        return {"job": job, "state": "cancelled", "sent": 0}
    if finished is not None and finished.kind == "export":
        _ended(r, store_url, job, "done")
        return {"job": job, "state": "done", "sent": 0}
    ready = (steps.ready_after(store, job, finished, _plan_cache, index=commit_index(r, store_url, job))
             if finished is not None else None)
    if ready is None:
        manifest, committed, groups, rec = steps.reconcile_job(store, job, cache=_plan_cache)
        index_listing(r, store, store_url, job, committed)
        if rec.done:
            _ended(r, store_url, job, "done")
            return {"job": job, "state": "done", "sent": 0}
        ready, missing = rec.ready, rec.missing
    else:
        manifest, groups = _plan_cache[("manifest", store.url, job)], _plan_cache[("groups", store.url, job)]
        missing = []
    r.hset(JOBS_KEY, active_field(store_url, job), "1")
    records = {w["id"]: w for w in workers()}
    live = {i: w for i, w in records.items() if is_live(w)}
    if idle_worker in live:
        live[idle_worker] = dict(live[idle_worker], task=None)
    sent = []
    evidence = InFlight(r, records)
    for task in ready:
        task_id = task.task_id(job)
        mark = mark_id(store_url, task_id)
        if evidence.running(mark):
            continue
        if not r.set(queued_key(mark), repr(time.time()), nx=True, ex=REQUEUE_AFTER):
            if not evidence.lost(mark):
                continue
            r.set(queued_key(mark), repr(time.time()), ex=REQUEUE_AFTER)  # lost: send it again
        need = plan.memory_class(plan.estimate_memory(task, manifest, groups))
        queue = plan.queue_name(need)
        preferred = affine_worker(r, store_url, job, task, need, live, manifest, groups)
        if preferred:
            live[preferred] = dict(live[preferred], task=task_id)  # one task per worker and advance
            # Short mark: if that worker does not take it soon, the next advance sends it to its class queue.
            r.set(queued_key(mark), repr(time.time()), ex=AFFINITY_WAIT_S)
            queue = personal_queue(preferred)
        app.send_task(RUN_TASK, args=[store_url, job, task.to_dict()], task_id=task_id, queue=queue)
        sent.append(task.name)
    return {"job": job, "state": "running", "sent": len(sent), "ready": len(ready), "missing": missing}


def _ended(r, store_url: str, job: str, state: str) -> None:
    """The job is no longer active; whoever follows it (JobEvents) hears so at once."""
    r.hdel(JOBS_KEY, active_field(store_url, job))
    r.publish(job_events_channel(store_url, job), state)


class JobEvents:
    """Waits between two polls of a job, and wakes as soon as a worker announces the job's end (Redis pub/sub),
    so that a follower does not sleep through the rest of its polling interval. Only a hint: the follower
    still reads the end from the store, and without Redis it simply sleeps."""

    def __init__(self, store_url: str, job: str):
        self._pubsub = None
        try:
            self._pubsub = redis_client().pubsub(ignore_subscribe_messages=True)
            self._pubsub.subscribe(job_events_channel(store_url, job))
        except Exception:  # no broker now: poll as before
            self.close()

    def wait(self, seconds: float) -> str | None:
        """Sleep up to `seconds` -> the state a worker announced meanwhile ('done', 'cancelled'), else None."""
        deadline = time.monotonic() + seconds
        while self._pubsub is not None and (left := deadline - time.monotonic()) > 0:
            try:
                message = self._pubsub.get_message(timeout=left)
            except Exception:
                self.close()
                break
            if message and message.get("type") == "message":
                return message["data"].decode()
        time.sleep(max(0.0, deadline - time.monotonic()))
        return None

    def close(self) -> None:
        if self._pubsub is not None:
            try:
                self._pubsub.close()
            except Exception:
                pass
            self._pubsub = None


# The committed-key index: a set per job in Redis that every commit adds to (note_committed) and that each
# full reconcile's listing makes complete (index_listing). While it is complete, one request answers which
# of a finished task's consumers are ready, where the store takes a lookup per key: about a dozen per task,
# each a round trip to S3. Redis flushed: the completeness flag goes with the set, and those lookups go back
# to the store until the next listing. A stale entry (an object found corrupt and deleted since) sends a
# task that reports its input missing; the full reconcile that follows drops the entry.
COMMITTED_TTL_S = 7 * 24 * 3600


def commit_index(r, store_url: str, job: str):
    """index(keys) for steps.ready_after: the subset of `keys` committed, None while the set is incomplete."""
    set_key, full_key = committed_key(store_url, job), committed_full_key(store_url, job)

    def index(wanted: list[str]) -> set[str] | None:
        if not wanted:
            return set()
        pipe = r.pipeline(transaction=False)
        pipe.exists(full_key, set_key)
        pipe.smismember(set_key, wanted)
        both, members = pipe.execute()
        return {k for k, m in zip(wanted, members) if m} if both == 2 else None

    return index


def note_committed(r, store_url: str, job: str, committed: list[str]) -> None:
    """Add keys just committed (or found committed) to the job's index, before the advance that reads it."""
    if committed:
        set_key = committed_key(store_url, job)
        pipe = r.pipeline(transaction=False)
        pipe.sadd(set_key, *committed)
        pipe.expire(set_key, COMMITTED_TTL_S)
        pipe.execute()


class KnownCommits:
    """The commits of task outputs as their writers made them (sha256, size), one Redis hash per job: a worker's
    cache serves an output it holds with no marker read (CachedStore.known), where on S3 each read of a block's
    earlier outputs (qweights, activations) was a request. A hint like the index above: a note the store no
    longer matches costs a read of the marker, a flushed Redis costs the marker reads of before, and a
    Redis that cannot be reached is skipped."""

    def __init__(self, store_url: str):
        self.store_url = store_url

    def _hash(self, key: str) -> str:
        return commits_key(self.store_url, keys.job_of(key))  # only task outputs are noted: always a job's

    def add(self, key: str, digest: str, size: int) -> None:
        try:
            pipe = redis_client().pipeline(transaction=False)
            pipe.hset(self._hash(key), key, f"{digest} {size}")
            pipe.expire(self._hash(key), COMMITTED_TTL_S)
            pipe.execute()
        except Exception:  # noqa: BLE001 - a hint: readers read the marker instead
            pass

    def drop(self, key: str) -> None:
        try:
            redis_client().hdel(self._hash(key), key)
        except Exception:  # noqa: BLE001
            pass

    def get(self, wanted: list[str]) -> dict:
        from tlq_farm.store.base import Commit

        by_hash: dict[str, list[str]] = {}
        for key in wanted:
            by_hash.setdefault(self._hash(key), []).append(key)
        try:
            pipe = redis_client().pipeline(transaction=False)
            for name, names in by_hash.items():
                pipe.hmget(name, names)
            answers = pipe.execute()
        except Exception:  # noqa: BLE001
            return {}
        found = {}
        for names, values in zip(by_hash.values(), answers):
            for key, value in zip(names, values):
                if value:
                    digest, size = value.decode().split()
                    found[key] = Commit(digest, int(size), 0.0)
        return found


def index_listing(r, store: Store, store_url: str, job: str, committed: set[str]) -> None:
    """Make the job's index complete from a listing of the job. A key it holds that the listing lacks is
    dropped only once the store says it is gone: it may have been committed (and added) after the listing."""
    set_key, full_key = committed_key(store_url, job), committed_full_key(store_url, job)
    held = {m.decode() for m in r.smembers(set_key)}
    gone = [k for k in sorted(held - committed) if not store.is_committed(k)]
    pipe = r.pipeline(transaction=True)
    if gone:
        pipe.srem(set_key, *gone)
    if committed - held:  # only what it lacks: a 7B job's listing holds tens of thousands of keys
        pipe.sadd(set_key, *sorted(committed - held))
    pipe.expire(set_key, COMMITTED_TTL_S)
    # The flag never outlives the set: the set's time is renewed by every commit, the flag's only here.
    pipe.set(full_key, "1", ex=COMMITTED_TTL_S)
    pipe.execute()


# A queued mark younger than this needs no evidence: its message may be between the sender and the queue,
# or between a worker's pop and its running mark.
GRACE_S = float(os.environ.get("TLQ_QUEUED_GRACE_S", max(2 * HEARTBEAT_S, 5.0)))
# kombu's Redis transport: each queue is a list of that name; a taken, unacknowledged message sits in the
# hash UNACKED (delivery tag -> [message, exchange, routing key]), with its delivery time in UNACKED_INDEX.
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"


def message_mark(message: dict) -> str | None:
    """The mark id (store URL + task id) of a Celery message of RUN_TASK, None for any other message."""
    headers = message.get("headers") or {}
    if headers.get("task") != RUN_TASK:
        return None
    try:
        body = message["body"]
        if (message.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return mark_id(args[0], headers["id"])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


class InFlight:
    """Which tasks are demonstrably somewhere, read from Redis once per advance and only when needed."""

    def __init__(self, r, records: dict):
        self.r = r
        self.records = records
        self.live = {i for i, w in records.items() if is_live(w)}
        self._marks: set[str] | None = None

    def marks(self) -> set[str]:
        if self._marks is None:
            queues = [plan.queue_name(c) for c in plan.MEMORY_CLASSES] + [personal_queue(w) for w in self.live]
            found: set[str] = set()
            for queue in queues:
                for raw in self.r.lrange(queue, 0, -1):
                    found.add(_raw_mark(raw))
            just_taken = self.r.zrangebyscore(UNACKED_INDEX, time.time() - GRACE_S, "+inf")
            for raw in self.r.hmget(UNACKED, just_taken) if just_taken else []:
                if raw:
                    found.add(_raw_mark(raw, unacked=True))
            self._marks = found - {None}
        return self._marks

    def lost(self, mark: str) -> bool:
        """A task marked queued that is in no queue, was not just taken, and runs nowhere."""
        sent = self.r.get(queued_key(mark))
        try:
            age = time.time() - float(sent) if sent else GRACE_S + 1
        except ValueError:
            age = GRACE_S + 1  # a mark written before marks carried their time
        if age <= GRACE_S or self.running(mark):
            return False
        return mark not in self.marks()

    def running(self, mark: str) -> bool:
        """Marked running by a worker that is live, or unknown here (its mark's TTL then decides).

        A worker whose heartbeat went stale is dead: its running marks go at once, not after their TTL."""
        owner = self.r.get(running_key(mark))
        if owner is None:
            return False
        owner = owner.decode()
        if owner in self.records and owner not in self.live:
            self.r.delete(running_key(mark))
            return False
        return True


def _raw_mark(raw: bytes, unacked: bool = False) -> str | None:
    try:
        message = json.loads(raw)
        return message_mark(message[0] if unacked else message)
    except (ValueError, IndexError, TypeError, AttributeError):
        return None


def stall_reason(store_url: str, job: str, ready: list, records: list[dict]) -> str | None:
    """Why a job with ready tasks makes no progress, or None while some ready task is somewhere.

    records: the workers' heartbeat records (live or not)."""
    if not ready:
        return None
    if not any(is_live(w) for w in records):
        return "no live worker: start one with `tlq-farm worker`"
    r = redis_client()
    evidence = InFlight(r, {w["id"]: w for w in records})
    for task in ready:
        mark = mark_id(store_url, task.task_id(job))
        if evidence.running(mark) or (r.exists(queued_key(mark)) and not evidence.lost(mark)):
            return None
    return (f"{len(ready)} ready task(s) are in no queue and run nowhere (lost with a worker or with Redis); "
            f"`tlq-farm resume {job}` sends them again")


# Kinds that read a shard's activations: sent to the worker that wrote them when it is idle.
AFFINE_KINDS = ("forward", "backward", "weights", "stats", "quantize", "propagate")
AFFINITY_WAIT_S = 10


def affine_worker(r, store_url: str, job: str, task, need: int, live: dict, manifest: dict,
                  groups: dict | None) -> str | None:
    """The live, idle worker that last read or wrote most of this task's shards (they are in its cache), if
    its memory class fits the task. Idle: its record names no task and nothing waits in its own queue (a
    task another job's advance sent it; the worker that calls this counts as idle by its record). Otherwise
    two jobs' chains whose shards one worker holds both go there, one waiting behind the other, while another
    worker has nothing (docs/benchmarks.md, "Farm")."""
    if task.kind not in AFFINE_KINDS:
        return None
    shards = plan.task_shards(task, manifest, groups)
    owners = [o.decode() for o in r.mget([affinity_key(store_url, job, k) for k in shards]) if o] if shards else []
    for owner in sorted(set(owners), key=lambda o: (-owners.count(o), o)):
        w = live.get(owner)
        if w and not w.get("task") and (w.get("class_bytes") or 0) >= need and not r.llen(personal_queue(w["id"])):
            return w["id"]
    return None


def advance_active_jobs() -> None:
    """advance() every job Redis lists as active (what a worker's heartbeat does now and then)."""
    from worker.app import store_refusal

    r = redis_client()
    for field in r.hkeys(JOBS_KEY):
        url, _, job = field.decode().rpartition("\n")
        if store_refusal(url) is None:  # another farm's store on this broker: not this worker's to touch
            advance(url, job)


def active_field(store_url: str, job: str) -> str:
    """Field of the active-jobs hash: store URL and job id (a job id is unique only within its store)."""
    return f"{store_url}\n{job}"


def is_live(record: dict, now: float | None = None) -> bool:
    """A worker is live while its heartbeat is fresh: younger than two of its own intervals (one beat may be
    late). A live worker taken for dead only costs a task computed twice, to the same bytes."""
    age = (now or time.time()) - record.get("last_seen", 0)
    return age < 2 * float(record.get("heartbeat_s") or HEARTBEAT_S)


def workers() -> list[dict]:
    """Heartbeat records of the workers, newest first."""
    from worker.app import WORKERS_KEY

    out = [json.loads(v) for v in redis_client().hgetall(WORKERS_KEY).values()]
    return sorted(out, key=lambda w: -w.get("last_seen", 0))
