"""The farm end to end: real Redis (a private redis-server), real HTTP S3 (moto), Celery workers as separate
processes. Exports must be the bytes of the embedded run, whatever happens to workers, coordinator or Redis.

Workers sleep TLQ_FAULT_SLEEP before each task so that a test can act while a job is part way.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from coordinator.cli import main
from tlq_farm.jobs import download_export
from tlq_farm import steps
from tlq_farm.staging import encode_calibration, job_id_for, stage_job
from tlq_farm.store import LocalStore, keys, open_store
from tlq_farm.store.tensors import get_json

from s3_server import moto_s3  # noqa: F401  (fixture)
from test_farm_support import (ROOT, export_bytes, farm_env, job_spec, make_job_files,  # noqa: F401
                               redis_server, start_worker, wait_for)

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(240)
SLEEP = "*:0"
# One group per block: fewer tasks in a row, for the tests that only need a job to run part way.
SHORT = {"true_sequential": False}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_job_files(tmp_path_factory.mktemp("farm"))


@pytest.fixture(scope="module")
def farm(redis_server, moto_s3, tmp_path_factory, files):  # noqa: F811
    """Two workers (large memory class) on a private Redis and a moto S3 bucket; tests may add more."""
    logs = tmp_path_factory.mktemp("farm-logs")
    env = farm_env(redis_server.url, moto_s3, TLQ_FAULT_SLEEP=SLEEP)
    store_url = f"s3://tlq-farm-test/{uuid.uuid4().hex[:8]}"
    state = {"env": env, "store_url": store_url, "logs": logs, "redis": redis_server, "procs": [],
             "references": {}, "files": files}
    state["procs"] += [start_worker(env, logs / "w1.log"), start_worker(env, logs / "w2.log")]
    store = open_store(store_url, endpoint_url=moto_s3)
    store.ensure_bucket()
    state["store"] = store
    wait_for(lambda: len(live_workers(redis_server)) >= 2, 90, "two workers to report")
    yield state
    for p in state["procs"]:
        if p.poll() is None:
            p.terminate()
    for p in state["procs"]:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()


@pytest.fixture(autouse=True)
def fresh_store(request, moto_s3):  # noqa: F811
    """Each test gets its own store prefix, so the same spec is a new job there (one reference serves all)."""
    if "farm" not in request.fixturenames:
        return
    farm = request.getfixturevalue("farm")
    farm["store_url"] = f"s3://tlq-farm-test/{uuid.uuid4().hex[:8]}"
    farm["store"] = open_store(farm["store_url"], endpoint_url=moto_s3)


def live_workers(redis_server):
    return [json.loads(v) for v in redis_server.client.hgetall("tlq:workers").values()
            if time.time() - json.loads(v)["last_seen"] < 5]


def reference(farm, tmp_path_factory, **quant) -> dict[str, bytes]:
    """The embedded run's export of the same spec (cached per spec)."""
    key = json.dumps(quant, sort_keys=True)
    if key not in farm["references"]:
        root = tmp_path_factory.mktemp("reference")
        store = LocalStore(root / "store")
        job, _ = stage_job(store, job_spec(*farm["files"], **quant))
        assert steps.run_embedded(store, job)
        download_export(store, job, root / "out")
        farm["references"][key] = export_bytes(root / "out")
    return farm["references"][key]


def run_args(farm, **quant) -> list[str]:
    model, calib = farm["files"]
    args = ["run", str(model), "--calib", str(calib), "--group-size", "32", "--samples", "6", "--seq-len", "512",
            "--shard-tokens", "45", "--qig-steps", "4", "--store", farm["store_url"], "--broker", farm["redis"].url, "--quiet"]
    for k, v in quant.items():
        flag = k.replace("_", "-")
        args += [f"--{flag}" if v else f"--no-{flag}"] if isinstance(v, bool) else [f"--{flag}", str(v)]
    return args


def coordinator(farm, args, **kw) -> subprocess.Popen:
    return subprocess.Popen([str(Path(sys.executable).parent / "tlq-farm"), *args], env=farm["env"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def cli(farm, args) -> str:
    res = CliRunner().invoke(main, args, env={k: farm["env"][k] for k in ("AWS_ENDPOINT_URL", "TLQ_BROKER_URL")})
    assert res.exit_code == 0, res.output
    return res.output


def submit(farm, **quant) -> str:
    out = cli(farm, run_args(farm, **quant) + ["--detach"])
    return out.strip().splitlines()[-1]


def wait_done(farm, job, timeout=120):
    wait_for(lambda: farm["store"].is_committed(keys.export_index(job)), timeout, f"job {job} to finish")


def fetched(farm, job, tmp_path) -> dict[str, bytes]:
    out = tmp_path / f"out-{job}"
    download_export(farm["store"], job, out)
    return export_bytes(out)


def task_records(farm, job) -> list[dict]:
    return [get_json(farm["store"], k) for k in farm["store"].list_committed(keys.tasks_prefix(job))]


def test_two_workers_export_the_embedded_bytes(farm, tmp_path, tmp_path_factory):
    expected = reference(farm, tmp_path_factory)
    out = tmp_path / "out"
    proc = coordinator(farm, run_args(farm) + ["--out", str(out)])
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output
    assert export_bytes(out) == expected
    job = output.split("job ")[1].split()[0]
    records = task_records(farm, job)
    assert len({r["worker"] for r in records}) == 2


def test_three_workers_two_jobs_at_once_and_memory_classes(farm, tmp_path, tmp_path_factory):
    # A third worker with a 1 MiB class: it may only take tasks estimated at 1 MiB or less.
    farm["procs"].append(start_worker(farm["env"], farm["logs"] / "w3-small.log", max_memory="1.5m"))
    wait_for(lambda: any(w["class"] == "1m" for w in live_workers(farm["redis"])), 90, "the small worker")
    expected = {seed: reference(farm, tmp_path_factory, seed=seed, **SHORT) for seed in (1, 2)}
    jobs = {seed: submit(farm, seed=seed, **SHORT) for seed in (1, 2)}
    for seed, job in jobs.items():
        wait_done(farm, job)
        assert fetched(farm, job, tmp_path) == expected[seed]
    records = [r for job in jobs.values() for r in task_records(farm, job)]
    assert all(r["estimate_bytes"] <= r["class_bytes"] for r in records)
    small = [r for r in records if r["class_bytes"] == 2**20]
    big = [r for r in records if r["class_bytes"] > 2**20]
    assert small and any(r["estimate_bytes"] > 2**20 for r in big)  # export is above the small class
    assert {r["worker"] for r in records} and len({r["worker"] for r in records}) == 3


def test_kill_9_a_worker_mid_task(farm, tmp_path, tmp_path_factory):
    expected = reference(farm, tmp_path_factory, seed=1, **SHORT)
    victim = start_worker(dict(farm["env"], TLQ_FAULT_SLEEP="*:60"), farm["logs"] / "victim.log")
    farm["procs"].append(victim)
    victim_id = wait_for(lambda: next((w["id"] for w in live_workers(farm["redis"]) if w["pid"] == victim.pid), None),
                         90, "the victim worker")
    job = submit(farm, seed=1, **SHORT)
    r = farm["redis"].client
    running = wait_for(lambda: next((k.decode() for k in r.keys("tlq:running:*") if r.get(k) == victim_id.encode()),
                                    None), 90, "the victim to start a task")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(10)
    wait_done(farm, job)
    assert fetched(farm, job, tmp_path) == expected
    killed_task = running.split(":", 3)[-1].split(".", 1)[1]  # tlq:running:<store>:<job>.<task>
    assert [rec["task"] for rec in task_records(farm, job)].count(killed_task) == 1


def test_kill_the_coordinator_then_status_reattaches(farm, tmp_path, tmp_path_factory):
    expected = reference(farm, tmp_path_factory, seed=1, **SHORT)
    proc = coordinator(farm, run_args(farm, seed=1, **SHORT) + ["--out", str(tmp_path / "never")])
    spec = job_spec(*farm["files"], seed=1, **SHORT)
    job = job_id_for(spec, Path(spec.model), encode_calibration(spec).samples)[0]

    def started():
        return len(farm["store"].list_committed(keys.tasks_prefix(job))) >= 5

    wait_for(started, 120, "the job to be part way")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    wait_done(farm, job)
    status = json.loads(cli(farm, ["status", job, "--store", farm["store_url"], "--json"]))
    assert status["state"] == "done" and status["progress"]["done"] == status["progress"]["total"]
    out = tmp_path / "out"
    text = cli(farm, run_args(farm, seed=1, **SHORT) + ["--out", str(out)])
    assert "attached to the existing job" in text
    assert export_bytes(out) == expected


def test_flush_redis_mid_job_then_resume_recomputes_nothing_committed(farm, tmp_path, tmp_path_factory):
    expected = reference(farm, tmp_path_factory, seed=1, **SHORT)
    job = submit(farm, seed=1, **SHORT)
    wait_for(lambda: len(farm["store"].list_committed(keys.tasks_prefix(job))) >= 10, 120, "10 tasks done")
    farm["redis"].client.flushall()
    flushed_at = time.time()
    committed_before = {r["task"] for r in task_records(farm, job) if r["finished"] < flushed_at}
    time.sleep(1.0)
    out = cli(farm, ["resume", job, "--store", farm["store_url"]])
    assert f"job {job}" in out
    wait_done(farm, job)
    assert fetched(farm, job, tmp_path) == expected
    runs: dict[str, int] = {}
    for r in task_records(farm, job):
        runs[r["task"]] = runs.get(r["task"], 0) + 1
    assert committed_before and all(runs[t] == 1 for t in committed_before)


def test_cancel_stops_one_job_and_not_the_other(farm, tmp_path, tmp_path_factory):
    expected = reference(farm, tmp_path_factory, seed=1, **SHORT)
    doomed = submit(farm, seed=2, **SHORT)
    kept = submit(farm, seed=1, **SHORT)
    cli(farm, ["cancel", doomed, "--store", farm["store_url"]])
    wait_done(farm, kept)
    assert fetched(farm, kept, tmp_path) == expected
    before = len(farm["store"].list_committed(keys.tasks_prefix(doomed)))
    time.sleep(2.0)
    assert len(farm["store"].list_committed(keys.tasks_prefix(doomed))) == before
    assert not farm["store"].is_committed(keys.export_index(doomed))
    status = json.loads(cli(farm, ["status", doomed, "--store", farm["store_url"], "--json"]))
    assert status["state"] == "cancelled"


def test_workers_command_lists_device_class_and_task(farm):
    out = json.loads(cli(farm, ["workers", "--json"]))
    assert len(out) >= 2
    assert all({"host", "device", "class", "last_seen", "task"} <= set(w) for w in out)
