"""The Celery app of the farm and its settings; `celery -A worker.app worker` and `tlq-farm worker` use it.

Settings follow the farm's protocol: late acks and rejection on a lost worker (a killed task is delivered
again), one message prefetched, JSON only, visibility timeout above the task time limit. Job state lives in
the store; Redis only carries messages, dedup marks (`queued` / `running`) and worker heartbeats.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from celery import Celery
from celery.signals import celeryd_after_setup, worker_ready, worker_shutdown

from tlq_farm import plan

TASK_TIME_LIMIT = int(os.environ.get("TLQ_TASK_TIME_LIMIT", 6 * 3600))
# A queued mark older than this is dropped and the task sent again (a message lost with Redis, say).
REQUEUE_AFTER = int(os.environ.get("TLQ_REQUEUE_AFTER", TASK_TIME_LIMIT + 600))
# A running mark lives this long unless its worker's heartbeat renews it: a killed worker's task is
# sent again once it lapses.
RUNNING_TTL = int(os.environ.get("TLQ_RUNNING_TTL", 30))
HEARTBEAT_S = float(os.environ.get("TLQ_HEARTBEAT_S", 5))
ADVANCE_EVERY_S = float(os.environ.get("TLQ_ADVANCE_EVERY", 15))

WORKERS_KEY = "tlq:workers"
JOBS_KEY = "tlq:jobs"


def normalize_store_url(url: str) -> str:
    """A store URL in one spelling: s3://BUCKET/PREFIX without trailing slashes, or an absolute folder path."""
    text = str(url).strip()
    if text.startswith("s3://"):
        return "s3://" + "/".join(part for part in text[len("s3://"):].split("/") if part)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return os.path.realpath(os.path.expanduser(text))


def allowed_stores() -> list[str]:
    """The stores this worker serves: TLQ_STORE_URL and the comma-separated TLQ_ALLOWED_STORES (each with
    everything below it). Task messages name their store, and whoever can write to Redis can send one."""
    urls = [os.environ.get("TLQ_STORE_URL", "")] + os.environ.get("TLQ_ALLOWED_STORES", "").split(",")
    return [normalize_store_url(u) for u in urls if u.strip()]


def store_refusal(store_url: str, allowed: list[str] | None = None) -> str | None:
    """Why this worker must not touch `store_url`, or None when it is one of its stores (or below one)."""
    allowed = allowed_stores() if allowed is None else allowed
    if not allowed:
        return ("this worker has no store configured: set TLQ_STORE_URL (or TLQ_ALLOWED_STORES) to the "
                "store(s) it may read and write, or pass `tlq-farm worker --store URL`")
    url = normalize_store_url(store_url)
    if any(url == a or url.startswith(a.rstrip("/") + "/") for a in allowed):
        return None
    return f"store {store_url} is not among this worker's stores ({', '.join(allowed)}; TLQ_STORE_URL / TLQ_ALLOWED_STORES)"


def broker_url() -> str:
    return os.environ.get("TLQ_BROKER_URL") or "redis://localhost:6379/0"


def mark_id(store_url: str, task_id: str) -> str:
    """A task id scoped by its store: the same job id may exist in two stores on one broker."""
    import hashlib

    return f"{hashlib.sha256(store_url.encode()).hexdigest()[:8]}:{task_id}"


def queued_key(task_id: str) -> str:
    return f"tlq:queued:{task_id}"


def running_key(task_id: str) -> str:
    return f"tlq:running:{task_id}"


def affinity_key(store_url: str, job: str, shard: int) -> str:
    """Which worker last wrote shard `shard`'s activations of `job` (it holds them in its cache)."""
    return f"tlq:affinity:{mark_id(store_url, job)}:{shard}"


def committed_key(store_url: str, job: str) -> str:
    """The set of `job`'s store keys seen committed: lets an advance find what a task made ready without a
    store lookup per key (dispatch.commit_index). A hint: the store stays the truth."""
    return f"tlq:committed:{mark_id(store_url, job)}"


def commits_key(store_url: str, job: str) -> str:
    """Hash of `job`'s task outputs -> "sha256 size" as their writers committed them (dispatch.KnownCommits)."""
    return f"tlq:commits:{mark_id(store_url, job)}"


def committed_full_key(store_url: str, job: str) -> str:
    """Present while committed_key(store_url, job) holds every committed key of the job: set after a listing
    of the job was added to it, lost with it when Redis is flushed."""
    return f"tlq:committed-full:{mark_id(store_url, job)}"


def job_events_channel(store_url: str, job: str) -> str:
    """Pub/sub channel on which workers announce that a job ended (done or cancelled)."""
    return f"tlq:events:{mark_id(store_url, job)}"


def personal_queue(worker_id: str) -> str:
    return f"tlq.worker.{worker_id}"


app = Celery("tlq_farm", broker=broker_url(), include=["worker.tasks"])
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    task_ignore_result=True,
    task_time_limit=TASK_TIME_LIMIT,
    broker_transport_options={"visibility_timeout": TASK_TIME_LIMIT + 600},
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,
    task_publish_retry=True,
    task_publish_retry_policy={"max_retries": 10, "interval_start": 0.5, "interval_step": 1, "interval_max": 10},
    task_default_queue=plan.queue_name(plan.MEMORY_CLASSES[0]),
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
)


_redis = None


def use_broker(url: str) -> None:
    """Point this process's app at another broker: the settings and every cached connection."""
    global _redis
    app.conf.broker_url = url
    _redis = None
    app._after_fork()  # drops the connection and producer pools bound to the old URL


def redis_client():
    """The Redis of the broker URL (dedup marks, heartbeats, active jobs)."""
    global _redis
    if _redis is None:
        import redis

        _redis = redis.Redis.from_url(app.conf.broker_url or broker_url(), socket_timeout=10, socket_connect_timeout=10)
    return _redis


# ----------------------------------------------------------------------------------------------- worker state

class WorkerState:
    """This worker's identity, probe and current task; renewed in Redis by the heartbeat thread."""

    def __init__(self):
        self.id = f"{socket.gethostname()}-{os.getpid()}"
        self.info: dict = {}
        self.current: str | None = None
        self.started = time.time()
        self.stop = threading.Event()

    def record(self) -> dict:
        return {"id": self.id, "host": socket.gethostname(), "pid": os.getpid(), **self.info,
                "task": self.current, "last_seen": time.time(), "started": self.started, "heartbeat_s": HEARTBEAT_S}

    def beat(self) -> None:
        r = redis_client()
        r.hset(WORKERS_KEY, self.id, json.dumps(self.record(), sort_keys=True))
        if self.current:
            r.set(running_key(self.current), self.id, ex=RUNNING_TTL)


STATE = WorkerState()


def _heartbeat_loop(advance=None) -> None:
    """Beat every HEARTBEAT_S; now and then (and when a worker went silent) start a round of advances.

    advance: what a round runs (default dispatch.advance_active_jobs)."""
    from worker import dispatch

    advance = advance or dispatch.advance_active_jobs
    last_advance = 0.0
    live_before: set[str] = set()
    advancing = threading.Event()  # set while a round runs: one at a time
    while not STATE.stop.wait(HEARTBEAT_S):
        try:
            STATE.beat()
            # A worker that just went silent held a task: send it again now, not at the next round.
            live_now = {w["id"] for w in dispatch.workers() if dispatch.is_live(w)}
            lost_worker = bool(live_before - live_now)
            live_before = live_now
            if (lost_worker or time.time() - last_advance >= ADVANCE_EVERY_S) and not advancing.is_set():
                last_advance = time.time()
                advancing.set()
                threading.Thread(target=_advance_round, args=(advance, advancing), name="tlq-advance",
                                 daemon=True).start()
        except Exception as error:  # a heartbeat must never kill the worker; the next beat tries again
            print(f"tlq worker {STATE.id}: heartbeat failed: {error}", flush=True)


def _advance_round(advance, advancing: threading.Event) -> None:
    """One round of advances, beside the heartbeat rather than in it: a full reconcile of a large job lists
    the whole job in the store (seconds over S3 at 7B), and a worker whose beats waited for it would look
    dead to the others after two missed beats (dispatch.is_live), which then send its running task again."""
    try:
        advance()
    except Exception as error:
        print(f"tlq worker {STATE.id}: advance failed: {error}", flush=True)
    finally:
        advancing.clear()


@celeryd_after_setup.connect
def _listen_on_class_queues(sender, instance, **kwargs):
    """Listen on the queue of every memory class up to this worker's own (probed)."""
    from worker.probe import probe

    STATE.info = probe()
    if os.environ.get("TLQ_AUTO_QUEUES", "1") != "0":
        for q in STATE.info["queues"] + [personal_queue(STATE.id)]:
            instance.app.amqp.queues.select_add(q)


@worker_ready.connect
def _start_heartbeat(sender=None, **kwargs):
    import torch

    threads = os.environ.get("TLQ_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    # Import the heavy libraries now, not inside the first task (whose time would look like a stall).
    from tlq_farm.heap import long_lived
    from tlq_farm.models.adapter import import_model_code

    import_model_code()
    with long_lived():
        import tlq_farm.steps  # noqa: F401

    STATE.beat()
    threading.Thread(target=_heartbeat_loop, name="tlq-heartbeat", daemon=True).start()


@worker_shutdown.connect
def _stop_heartbeat(sender=None, **kwargs):
    STATE.stop.set()
    try:
        redis_client().hdel(WORKERS_KEY, STATE.id)
    except Exception:
        pass
