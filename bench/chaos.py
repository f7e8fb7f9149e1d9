"""Fault trials on a real farm: every finished job must export the embedded run's bytes, with no manual step.

    .venv/bin/python bench/chaos.py [--trials 40] [--kills 20] [--seed 0] [--json out.jsonl]

A private redis-server, moto's S3 server over HTTP and 2 `tlq-farm worker` processes, on a tiny Qwen2-VL
(2 blocks, 6 image samples in 3 shards). Each trial stages a new job (its own store prefix) and injects one
fault at a random moment (seeded):

  worker-kill       SIGKILL a random worker and start another at once
  coordinator-kill  SIGKILL a following `tlq-farm run`, then run the same command again
  flushall          FLUSHALL the broker, then `tlq-farm resume JOB`
  corrupt           overwrite one committed computed object in the bucket, then `tlq-farm verify JOB`
  cancel            two jobs at once, cancel one: the other must finish

The documented recovery of each fault (rerun the command, `resume`, `verify`) is part of the trial; a job
that does not finish within --timeout is a manual step. For worker kills the table gives the time from the
kill until the task the victim held started again elsewhere, against the workers' heartbeat interval.
Prints one JSON line per trial and a Markdown table (docs/benchmarks.md, section "Faults").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from s3_server import DUMMY_ENVIRONMENT, start_moto  # noqa: E402
from test_farm_support import RedisServer, export_bytes, farm_env, job_spec, make_job_files  # noqa: E402

from tlq_farm import steps  # noqa: E402
from tlq_farm.staging import stage_job  # noqa: E402
from tlq_farm.store import LocalStore, keys, open_store  # noqa: E402
from tlq_farm.store.tensors import get_json  # noqa: E402

BUCKET = "tlq-chaos"
HEARTBEAT_S = 1.0
# Task sleep: the tiny model's tasks take milliseconds; a short sleep gives faults a job to land in.
TASK_SLEEP_S = 0.3
KINDS = ("coordinator-kill", "flushall", "corrupt", "cancel")
CLI = str(Path(sys.executable).parent / "tlq-farm")


def digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


class Farm:
    """The broker, the S3 endpoint and the worker processes of all trials."""

    def __init__(self, root: Path, workers: int = 2):
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
        os.environ.update(DUMMY_ENVIRONMENT)
        self.root = root
        self.moto, self.endpoint = start_moto()
        self.redis = RedisServer()
        self.env = farm_env(self.redis.url, self.endpoint, stores=f"s3://{BUCKET}",
                            TLQ_HEARTBEAT_S=HEARTBEAT_S, TLQ_ADVANCE_EVERY=15, TLQ_RUNNING_TTL=30,
                            TLQ_FAULT_SLEEP=f"*:{TASK_SLEEP_S}")
        self.cli_env = dict(os.environ, AWS_ENDPOINT_URL=self.endpoint, TLQ_BROKER_URL=self.redis.url,
                            PYTHONPATH=str(ROOT))
        import boto3

        self.s3 = boto3.client("s3", endpoint_url=self.endpoint)
        self.s3.create_bucket(Bucket=BUCKET)
        self.procs: list[subprocess.Popen] = []
        self.count = 0
        for _ in range(workers):
            self.start_worker()
        self.wait_workers(workers)

    def start_worker(self) -> subprocess.Popen:
        self.count += 1
        log = open(self.root / f"worker-{self.count}.log", "ab")
        p = subprocess.Popen([CLI, "worker", "--loglevel", "WARNING"], env=self.env, cwd=ROOT, stdout=log,
                             stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def live(self) -> list[dict]:
        now = time.time()
        records = [json.loads(v) for v in self.redis.client.hgetall("tlq:workers").values()]
        pids = {p.pid for p in self.procs if p.poll() is None}
        return [w for w in records if w.get("pid") in pids and now - w["last_seen"] < 2 * HEARTBEAT_S + 1]

    def wait_workers(self, n: int, timeout: float = 120) -> None:
        end = time.time() + timeout
        while len(self.live()) < n:
            if time.time() > end:
                raise RuntimeError(f"only {len(self.live())} of {n} workers reported within {timeout}s")
            time.sleep(0.3)

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([CLI, *args], env=self.cli_env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.redis.stop()
        self.moto.stop()


class Trial:
    """One job (or two) in a fresh store prefix."""

    def __init__(self, farm: Farm, files, timeout: float):
        self.farm = farm
        self.files = files
        self.timeout = timeout
        self.store_url = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"
        self.store = open_store(self.store_url, endpoint_url=farm.endpoint)

    def run_args(self, seed: int) -> list[str]:
        model, calib = self.files
        return ["run", str(model), "--calib", str(calib), "--group-size", "32", "--samples", "6", "--seq-len", "512",
                "--shard-tokens", "45", "--qig-steps", "4", "--no-true-sequential", "--seed", str(seed),
                "--store", self.store_url, "--quiet"]

    def submit(self, seed: int) -> str:
        res = self.farm.cli(*self.run_args(seed), "--detach")
        if res.returncode != 0:
            raise RuntimeError(f"submit failed: {res.stdout}{res.stderr}")
        return res.stdout.strip().splitlines()[-1]

    def done(self, job: str) -> bool:
        return self.store.is_committed(keys.export_index(job))

    def wait(self, job: str) -> bool:
        end = time.time() + self.timeout
        while time.time() < end:
            if self.done(job):
                return True
            time.sleep(0.25)
        return False

    def export_digest(self, job: str) -> str:
        out = Path(tempfile.mkdtemp(prefix="chaos-out-", dir=self.farm.root)) / "export"
        res = self.farm.cli("export", job, "--store", self.store_url, "--out", str(out))
        if res.returncode != 0:
            raise RuntimeError(f"export failed: {res.stdout}{res.stderr}")
        return digest(export_bytes(out))

    def records(self, job: str) -> list[dict]:
        return [get_json(self.store, k) for k in self.store.list_committed(keys.tasks_prefix(job))]

    def progress(self, job: str) -> int:
        return len(self.store.list_committed(keys.tasks_prefix(job)))


def worker_kill(trial: Trial, rng: random.Random, expected_s: float) -> dict:
    farm = trial.farm
    job = trial.submit(1)
    time.sleep(rng.uniform(0.2, expected_s))
    live = farm.live()
    busy = [w for w in live if w.get("task")]
    victim = rng.choice(busy or live) if live else None  # a busy one when there is one: the harder case
    held = victim.get("task") if victim else None
    killed_at = time.time()
    if victim:
        os.kill(victim["pid"], signal.SIGKILL)
    farm.start_worker()
    finished = trial.wait(job)
    out = {"job": job, "finished": finished, "victim_busy": bool(held)}
    if finished and held:
        name = held.split(".", 1)[1]  # <store hash>:<job>.<task name>
        reruns = [r for r in trial.records(job) if r["task"] == name and r["started"] >= killed_at - 0.5]
        if reruns:
            out["task"] = name
            out["restarted_after_s"] = round(min(r["started"] for r in reruns) - killed_at, 2)
    farm.wait_workers(2)
    return out


def coordinator_kill(trial: Trial, rng: random.Random, expected_s: float) -> dict:
    farm = trial.farm
    out_dir = farm.root / f"out-{uuid.uuid4().hex[:6]}"
    args = trial.run_args(1) + ["--out", str(out_dir)]
    proc = subprocess.Popen([CLI, *args], env=farm.cli_env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(0.5, expected_s))
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    res = farm.cli(*args, timeout=trial.timeout)
    ok = res.returncode == 0 and (out_dir / "tlq_report.json").exists()
    found = re.search(r"job ([a-z0-9]+) ", res.stderr or "")
    job = found.group(1) if found else None
    row = {"job": job, "finished": ok, "attached": "attached to the existing job" in res.stderr}
    if not ok:
        row["stderr"] = (res.stderr or "")[-400:]
    return row


def flushall(trial: Trial, rng: random.Random, expected_s: float) -> dict:
    job = trial.submit(1)
    time.sleep(rng.uniform(0.2, expected_s))
    trial.farm.redis.client.flushall()
    res = trial.farm.cli("resume", job, "--store", trial.store_url)
    return {"job": job, "finished": res.returncode == 0 and trial.wait(job)}


def corrupt(trial: Trial, rng: random.Random, expected_s: float) -> dict:
    job = trial.submit(1)
    time.sleep(rng.uniform(0.2, expected_s))
    computed = [k for k in trial.store.list_committed(keys.job_prefix(job))
                if any(f"/{part}/" in k for part in ("acts", "stats", "qweights", "token_weights", "grads"))]
    target = rng.choice(computed) if computed else None
    corrupted_at = time.time()
    if target:
        full = f"{trial.store_url[len(f's3://{BUCKET}/'):]}/{target}"
        trial.farm.s3.put_object(Bucket=BUCKET, Key=full, Body=b"garbage " + os.urandom(64))
    finished = trial.wait(job)
    marker = trial.store.commit_info(target) if target else None
    rewritten = bool(marker and marker.time > corrupted_at)  # found while the job ran, deleted, recomputed
    verify = trial.farm.cli("verify", job, "--store", trial.store_url, "--json")
    found = None
    try:
        found = json.loads(verify.stdout).get("corrupt")
    except ValueError:
        pass
    if finished and verify.returncode != 0:
        # verify deleted what it found; resume recomputes whatever the export still needs (nothing, if done)
        trial.farm.cli("resume", job, "--store", trial.store_url)
    return {"job": job, "finished": finished, "corrupted": target, "recomputed_during_job": rewritten,
            "verify_rc": verify.returncode, "verify_found": found}


def cancel(trial: Trial, rng: random.Random, expected_s: float) -> dict:
    kept = trial.submit(1)
    doomed = trial.submit(2)
    time.sleep(rng.uniform(0.2, expected_s / 3))  # early enough that the doomed job is still running
    trial.farm.cli("cancel", doomed, "--store", trial.store_url)
    finished = trial.wait(kept)
    state = json.loads(trial.farm.cli("status", doomed, "--store", trial.store_url, "--json").stdout or "{}")
    return {"job": kept, "finished": finished, "other_state": state.get("state"),
            "other_exported": trial.done(doomed)}


FAULTS = {"worker-kill": worker_kill, "coordinator-kill": coordinator_kill, "flushall": flushall,
          "corrupt": corrupt, "cancel": cancel}


def reference_digest(files, root: Path) -> tuple[str, float]:
    """The embedded run's export digest of the trials' spec, and its wall time."""
    store = LocalStore(root / "reference-store")
    started = time.time()
    job, _ = stage_job(store, job_spec(*files, seed=1, true_sequential=False))
    assert steps.run_embedded(store, job)
    from tlq_farm.jobs import download_export

    download_export(store, job, root / "reference")
    return digest(export_bytes(root / "reference")), time.time() - started


def plan_trials(n: int, kills: int, rng: random.Random) -> list[str]:
    rest = [KINDS[i % len(KINDS)] for i in range(n - kills)]
    kinds = ["worker-kill"] * kills + rest
    rng.shuffle(kinds)
    return kinds


def summarize(rows: list[dict]) -> str:
    lines = ["| fault | trials | identical export | manual steps | recovery |", "|---|---|---|---|---|"]
    for kind in FAULTS:
        sel = [r for r in rows if r["fault"] == kind]
        if not sel:
            continue
        same = sum(r.get("identical", False) for r in sel)
        manual = sum(not r.get("finished", False) for r in sel)
        times = sorted(r["restarted_after_s"] for r in sel if "restarted_after_s" in r)
        if times:
            rec = (f"held task restarted after {times[len(times) // 2]:.1f} s median, {times[-1]:.1f} s max "
                   f"({len(times)} busy victims)")
        else:
            walls = sorted(r["wall_s"] for r in sel)
            rec = f"job done {walls[len(walls) // 2]:.0f} s median after submit"
        lines.append(f"| {kind} | {len(sel)} | {same}/{len(sel)} | {manual} | {rec} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--kills", type=int, default=20, help="how many of the trials are worker kills")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=240, help="a job not done by then counts as a manual step")
    ap.add_argument("--json", type=Path, help="also write the trial rows here (JSON lines)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="tlq-chaos-"))
    files = make_job_files(root)
    expected, reference_s = reference_digest(files, root)
    farm = Farm(root)
    rows = []
    try:
        # One clean farm run first: how long a job takes here, so faults land inside one.
        clean = Trial(farm, files, args.timeout)
        t0 = time.time()
        job = clean.submit(1)
        assert clean.wait(job), "the clean farm run did not finish"
        expected_s = time.time() - t0
        assert clean.export_digest(job) == expected, "the clean farm run differs from the embedded run"
        for i, kind in enumerate(plan_trials(args.trials, args.kills, rng)):
            trial = Trial(farm, files, args.timeout)
            started = time.time()
            row = {"trial": i, "fault": kind, **FAULTS[kind](trial, rng, expected_s)}
            row["wall_s"] = round(time.time() - started, 1)
            if row.get("finished") and row.get("job"):
                row["identical"] = trial.export_digest(row["job"]) == expected
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        farm.close()
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"\n{len(rows)} trials, seed {args.seed}; embedded run {reference_s:.1f} s, clean farm run "
          f"{expected_s:.1f} s; 2 workers, heartbeat {HEARTBEAT_S:g} s, task sleep {TASK_SLEEP_S:g} s; "
          f"{platform.machine()}, {os.cpu_count()} CPUs\n")
    print(summarize(rows))


if __name__ == "__main__":
    main()
