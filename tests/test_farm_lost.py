"""Tasks lost with a worker: a queued mark never outlives the evidence that its task is somewhere.

A private redis-server, a moto S3 bucket and real Celery workers as separate processes. The fault hook
TLQ_FAULT_CRASH_TAKEN kills a worker right after it took a task's message and before the task starts:
the message is then neither queued nor running, and its queued mark would live for REQUEUE_AFTER (hours).
"""

import json
import time
import uuid

import pytest
from click.testing import CliRunner

from coordinator.cli import main
from tlq_farm.plan import Task
from tlq_farm.store import keys, open_store
from worker import app as worker_app
from worker import dispatch

from s3_server import moto_s3  # noqa: F401  (fixture)
from test_farm_support import RedisServer, as_broker, export_bytes, farm_env, make_job_files, start_worker, wait_for

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def redis_server():
    yield from as_broker(RedisServer())


@pytest.fixture(autouse=True)
def clean_redis(redis_server):
    redis_server.client.flushall()


def fake_worker(r, worker_id: str, heartbeat_s: float = 5.0) -> dict:
    record = {"id": worker_id, "last_seen": time.time(), "heartbeat_s": heartbeat_s, "task": None, "class_bytes": 1 << 40}
    r.hset(worker_app.WORKERS_KEY, worker_id, json.dumps(record))
    return record


def age_mark(r, mark: str, seconds: float) -> None:
    r.set(worker_app.queued_key(mark), repr(time.time() - seconds), ex=worker_app.REQUEUE_AFTER)


def test_a_queued_mark_is_trusted_only_with_evidence(redis_server):
    r = redis_server.client
    store_url, job = "s3://tlq-farm-test/lost", "job1"
    task = Task("propagate", block=0, shard=1)
    mark = worker_app.mark_id(store_url, task.task_id(job))
    live = {"w1": fake_worker(r, "w1")}
    # A real message waiting in a class queue (no worker consumes it here): the task is somewhere.
    class_queue = dispatch.plan.queue_name(dispatch.plan.MEMORY_CLASSES[0])
    worker_app.app.send_task(dispatch.RUN_TASK, args=[store_url, job, task.to_dict()], task_id=task.task_id(job),
                             queue=class_queue)
    age_mark(r, mark, 3600)
    assert r.llen(class_queue) == 1
    assert not dispatch.InFlight(r, live).lost(mark)
    # Taken moments ago (kombu's unacked index): still somewhere.
    raw = r.rpop(class_queue)
    r.hset(dispatch.UNACKED, "tag-1", json.dumps([json.loads(raw), "", class_queue]))
    r.zadd(dispatch.UNACKED_INDEX, {"tag-1": time.time()})
    assert not dispatch.InFlight(r, live).lost(mark)
    # Taken long ago by a worker that never marked it running (it died): lost.
    r.zadd(dispatch.UNACKED_INDEX, {"tag-1": time.time() - 3600})
    assert dispatch.InFlight(r, live).lost(mark)
    # A fresh mark needs no evidence (the message may be on its way), a running mark is evidence.
    age_mark(r, mark, 0)
    assert not dispatch.InFlight(r, live).lost(mark)
    age_mark(r, mark, 3600)
    r.set(worker_app.running_key(mark), "w1", ex=30)
    assert not dispatch.InFlight(r, live).lost(mark)
    # The same task id in another store is not evidence for this one.
    r.delete(worker_app.running_key(mark))
    other = worker_app.mark_id("s3://tlq-farm-test/other", task.task_id(job))
    assert other != mark and dispatch.InFlight(r, live).lost(mark)


def test_stall_reason_names_idle_ready_work(redis_server):
    r = redis_server.client
    store_url, job = "s3://tlq-farm-test/stall", "job2"
    ready = [Task("propagate", block=0, shard=0), Task("propagate", block=0, shard=1)]
    assert "no live worker" in dispatch.stall_reason(store_url, job, ready, [])
    assert "no live worker" in dispatch.stall_reason(store_url, job, ready, [dict(fake_worker(r, "w0"), last_seen=0)])
    live = [fake_worker(r, "w1")]
    assert "`tlq-farm resume job2`" in dispatch.stall_reason(store_url, job, ready, live)  # never sent
    mark = worker_app.mark_id(store_url, ready[1].task_id(job))
    age_mark(r, mark, 0)
    assert dispatch.stall_reason(store_url, job, ready, live) is None  # just sent
    age_mark(r, mark, 3600)
    assert "in no queue and run nowhere" in dispatch.stall_reason(store_url, job, ready, live)
    r.set(worker_app.running_key(mark), "w1", ex=30)
    assert dispatch.stall_reason(store_url, job, ready, live) is None


def test_an_affine_task_goes_to_an_idle_holder_of_its_shards_with_nothing_queued(redis_server):
    """A task whose shards a worker holds goes to that worker only while it is idle with an empty queue of its
    own; otherwise to the next holder, or to its class queue (None), never to wait behind another job's task."""
    r = redis_server.client
    store_url, job = "s3://tlq-farm-test/affine", "job3"
    # One statistics partition over both shards (an [64, 64] Gram outweighs them): a quantize task reads both.
    manifest = {"shards": [[0, 1], [1, 2]], "shard_tokens": [10, 10], "sizes": {"hidden": 8},
                "spec": {"quant": {"method": "gptq", "importance": "uniform"}}}
    groups = {"blocks": [{"groups": [["a"]], "in_features": {"a": 64}, "inputs": [["a"]], "shapes": {"a": [8, 64]}}]}
    task = Task("quantize", block=0, group=0)
    assert dispatch.plan.task_shards(task, manifest, groups) == [0, 1]
    live = {w: fake_worker(r, w) for w in ("w1", "w2")}
    r.set(worker_app.affinity_key(store_url, job, 0), "w2")
    r.set(worker_app.affinity_key(store_url, job, 1), "w2")

    def pick():
        return dispatch.affine_worker(r, store_url, job, task, 1, live, manifest, groups)

    assert pick() == "w2"
    r.set(worker_app.affinity_key(store_url, job, 1), "w1")  # one shard each: the first id of the two
    assert pick() == "w1"
    r.rpush(worker_app.personal_queue("w1"), b"another job's task")
    assert pick() == "w2"
    live["w2"] = dict(live["w2"], task="running something")
    assert pick() is None
    assert dispatch.affine_worker(r, store_url, job, Task("export"), 1, live, manifest, groups) is None  # not affine


def test_the_committed_index_answers_only_while_complete_and_drops_what_the_store_lost(redis_server, tmp_path):
    """The farm's index of committed keys says nothing (None) until a listing made it complete, nor after Redis
    lost it; a key committed after a listing stays, one the store no longer has goes at the next listing."""
    from tlq_farm.store import LocalStore

    r = redis_server.client
    store = LocalStore(tmp_path / "store")
    job = "job5"
    a, b, c = (f"jobs/{job}/acts/{n}" for n in "abc")
    for k in (a, b):
        store.put_bytes(k, b"x")
    index = dispatch.commit_index(r, store.url, job)
    assert index([a]) is None
    dispatch.note_committed(r, store.url, job, [a])
    assert index([a]) is None  # what was added, but not yet a listing of the whole job
    dispatch.index_listing(r, store, store.url, job, {a, b})
    assert index([a, b, c]) == {a, b} and index([]) == set()
    store.put_bytes(c, b"x")
    dispatch.note_committed(r, store.url, job, [c])
    dispatch.index_listing(r, store, store.url, job, {a, b})  # a listing taken before c was committed
    assert index([a, b, c]) == {a, b, c}
    store.delete(b)  # found corrupt and deleted by a reader
    dispatch.index_listing(r, store, store.url, job, {a, c})
    assert index([a, b, c]) == {a, c}
    assert dispatch.commit_index(r, "s3://other/store", job)([a]) is None  # another store's job of that id
    r.flushall()
    assert index([a]) is None


def test_a_follower_hears_the_end_of_its_job_and_only_of_its_job(redis_server):
    """`tlq-farm run` sleeps between polls in JobEvents.wait: a worker's announcement of the job's end wakes
    it; another job's, or the same job id in another store, does not."""
    store_url, job = "s3://tlq-farm-test/events", "job6"
    events = dispatch.JobEvents(store_url, job)
    try:
        dispatch._ended(redis_server.client, store_url, "other-job", "done")
        dispatch._ended(redis_server.client, "s3://tlq-farm-test/elsewhere", job, "done")
        assert events.wait(0.5) is None
        dispatch._ended(redis_server.client, store_url, job, "cancelled")
        assert events.wait(60) == "cancelled"
    finally:
        events.close()


def test_store_allow_list():
    allowed = [worker_app.normalize_store_url(u) for u in ("s3://farm/runs/", "/srv/tlq")]
    assert worker_app.store_refusal("s3://farm/runs", allowed) is None
    assert worker_app.store_refusal("s3://farm/runs/team-a", allowed) is None
    assert worker_app.store_refusal("/srv/tlq/x/../y", allowed) is None
    assert "not among this worker's stores" in worker_app.store_refusal("s3://farm/runs-evil", allowed)
    assert "not among" in worker_app.store_refusal("s3://farm", allowed)
    assert "not among" in worker_app.store_refusal("/srv/tlq/../etc", allowed)
    assert "no store configured" in worker_app.store_refusal("s3://farm/runs", [])


def run_cli(args, env):
    res = CliRunner().invoke(main, args, env=env)
    return res.exit_code, res.output


def test_worker_killed_between_taking_and_running(redis_server, moto_s3, tmp_path):  # noqa: F811
    """The job finishes with a replacement worker long before REQUEUE_AFTER, and `status` says "stalled"."""
    model, calib = make_job_files(tmp_path)
    store_url = f"s3://tlq-farm-test/{uuid.uuid4().hex[:8]}"
    store = open_store(store_url, endpoint_url=moto_s3)
    store.ensure_bucket()
    flag = tmp_path / "crashed"
    victim_task = Task("groups").name  # not sent by shard affinity
    env = farm_env(redis_server.url, moto_s3, TLQ_FAULT_CRASH_TAKEN=victim_task, TLQ_FAULT_CRASH_FLAG=flag)
    assert int(env.get("TLQ_REQUEUE_AFTER", worker_app.REQUEUE_AFTER)) > 3600
    victim = start_worker(env, tmp_path / "victim.log")
    cli_env = {"AWS_ENDPOINT_URL": moto_s3, "TLQ_BROKER_URL": redis_server.url}
    args = ["run", str(model), "--calib", str(calib), "--group-size", "32", "--samples", "6", "--seq-len", "512",
            "--shard-tokens", "45", "--qig-steps", "4", "--no-true-sequential", "--store", store_url, "--quiet", "--detach"]
    code, out = run_cli(args, cli_env)
    assert code == 0, out
    job = out.strip().splitlines()[-1]
    assert victim.wait(240) == 137, (tmp_path / "victim.log").read_text()
    assert flag.read_text() == victim_task
    mark = worker_app.mark_id(store.url, f"{job}.{victim_task}")
    assert redis_server.client.ttl(worker_app.queued_key(mark)) > 3600  # the dead worker left a long mark
    wait_for(lambda: not any(dispatch.is_live(w) for w in dispatch.workers()), 30, "the victim's heartbeat to go stale")
    code, out = run_cli(["status", job, "--store", store_url, "--json"], cli_env)
    assert code == 0, out
    status = json.loads(out)
    assert status["state"] == "stalled" and "no live worker" in status["stalled"]
    killed_at = time.time()
    rescuer = start_worker(dict(env, TLQ_FAULT_CRASH_TAKEN=""), tmp_path / "rescuer.log")
    try:
        wait_for(lambda: store.is_committed(keys.export_index(job)), 180, "the job to finish")
    finally:
        rescuer.terminate()
        rescuer.wait(30)
    assert time.time() - killed_at < 180 < worker_app.REQUEUE_AFTER
    records = [json.loads(store.get_bytes(k)) for k in store.list_committed(keys.tasks_prefix(job))]
    assert [rec["task"] for rec in records].count(victim_task) == 1
    out_dir = tmp_path / "out"
    code, text = run_cli(["export", job, "--store", store_url, "--out", str(out_dir)], cli_env)
    assert code == 0, text
    assert export_bytes(out_dir) == embedded_export(tmp_path, model, calib)


def embedded_export(tmp_path, model, calib) -> dict[str, bytes]:
    from tlq_farm.jobs import download_export
    from test_farm_support import job_spec
    from tlq_farm import steps
    from tlq_farm.staging import stage_job
    from tlq_farm.store import LocalStore

    store = LocalStore(tmp_path / "reference-store")
    job, _ = stage_job(store, job_spec(model, calib, true_sequential=False))
    assert steps.run_embedded(store, job)
    download_export(store, job, tmp_path / "reference")
    return export_bytes(tmp_path / "reference")


def test_a_worker_refuses_stores_it_was_not_given(redis_server, moto_s3, tmp_path):  # noqa: F811
    model, calib = make_job_files(tmp_path)
    store_url = f"s3://tlq-farm-test/{uuid.uuid4().hex[:8]}"
    store = open_store(store_url, endpoint_url=moto_s3)
    store.ensure_bucket()
    env = farm_env(redis_server.url, moto_s3, stores="s3://tlq-farm-test/only-this-one")
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        wait_for(lambda: any(dispatch.is_live(w) for w in dispatch.workers()), 90, "the worker to report")
        cli_env = {"AWS_ENDPOINT_URL": moto_s3, "TLQ_BROKER_URL": redis_server.url}
        code, out = run_cli(["run", str(model), "--calib", str(calib), "--group-size", "32", "--samples", "6", "--shard-tokens", "45",
                             "--store", store_url, "--quiet", "--detach"], cli_env)
        assert code == 0, out
        job = out.strip().splitlines()[-1]
        wait_for(lambda: "refused task" in (tmp_path / "worker.log").read_text(), 60, "the refusal in the log")
    finally:
        worker.terminate()
        worker.wait(30)
    log = (tmp_path / "worker.log").read_text()
    assert f"store {store_url} is not among this worker's stores" in log
    assert store.list_committed(keys.tasks_prefix(job)) == []  # nothing computed, nothing written


def test_worker_command_needs_a_store(redis_server):
    res = CliRunner().invoke(main, ["worker", "--broker", redis_server.url], env={"TLQ_STORE_URL": "",
                                                                                 "TLQ_ALLOWED_STORES": ""})
    assert res.exit_code == 2 and "this worker has no store: pass --store" in res.output


def test_a_slow_round_of_advances_does_not_hold_up_the_heartbeat(redis_server, monkeypatch):
    """A round of advances longer than two heartbeats (a full reconcile of a large job over S3) runs beside the
    beats: the worker's record stays fresh meanwhile, so the others do not take it for dead and send its
    running task again; and a second round waits for the first."""
    import threading

    monkeypatch.setattr(worker_app, "HEARTBEAT_S", 0.1)
    monkeypatch.setattr(worker_app, "ADVANCE_EVERY_S", 0.0)
    state = worker_app.WorkerState()
    monkeypatch.setattr(worker_app, "STATE", state)
    state.current = "store:job.task"
    started, release, rounds = threading.Event(), threading.Event(), []

    def slow_round():
        rounds.append(time.time())
        started.set()
        release.wait(10)

    loop = threading.Thread(target=worker_app._heartbeat_loop, args=(slow_round,), daemon=True)
    loop.start()
    try:
        assert started.wait(5)
        time.sleep(1.0)  # ten beats' time with the round still running
        (record,) = [w for w in dispatch.workers() if w["id"] == state.id]
        assert record["last_seen"] > rounds[0] + 0.5
        assert len(rounds) == 1
        release.set()
        wait_for(lambda: len(rounds) >= 2, 5, "the next round, once the first ended")
    finally:
        release.set()
        state.stop.set()
        loop.join(5)
