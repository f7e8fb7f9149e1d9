"""Shared pieces of the farm tests (no tests here): a tiny VLM with a calibration set, Redis, workers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tlq_farm.spec import JobSpec, QuantSpec
from tlq_farm.store import LocalStore

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["what is in the image?", "describe this picture.", "how many colors are there?"]
ANSWERS = ["a red cat.", "two blue cars.", "three colors."]


def make_job_files(root: Path, n_samples: int = 6) -> tuple[Path, Path]:
    """A tiny Qwen2-VL (2 blocks) and a JSONL calibration set of n_samples image rows."""
    from tlq_farm.models.tiny import make_tiny, write_image_calib

    model = make_tiny("qwen2_vl", root / "model", seed=0)
    return model, write_image_calib(root / "calib", n_samples, size=56, prompts=PROMPTS, answers=ANSWERS)


class CountingStore(LocalStore):
    """A folder store that lists the keys of the objects it reads (get_bytes and get_file), the prefixes
    it lists (list_committed) and the markers it looks up (is_committed)."""

    def __init__(self, root):
        super().__init__(root)
        self.reads = []
        self.listings = []
        self.lookups = []

    def is_committed(self, key):
        self.lookups.append(key)
        return super().is_committed(key)

    def list_committed(self, prefix=""):
        self.listings.append(prefix)
        return super().list_committed(prefix)

    def get_bytes(self, key, commit=None):
        self.reads.append(key)
        return super().get_bytes(key, commit=commit)

    def get_file(self, key, path, commit=None):
        self.reads.append(key)
        return super().get_file(key, path, commit=commit)


def job_spec(model: Path, calib: Path, **quant) -> JobSpec:
    """6 samples of ~21 tokens in 3 shards of at most 45 tokens."""
    seed = quant.pop("seed", 0)
    partition_tokens = quant.pop("partition_tokens", 0)
    q = QuantSpec(**{"group_size": 32, "qig_steps": 4, **quant})
    return JobSpec(model=str(model), calib=str(calib), quant=q, samples=6, seq_len=512, shard_tokens=45, seed=seed,
                   partition_tokens=partition_tokens)


def export_bytes(folder: Path) -> dict[str, bytes]:
    """Every file's bytes; tlq_report.json's without its timings and peak memory, which no two runs share."""
    from tlq_farm.report import comparable_report_bytes

    out = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    if "tlq_report.json" in out:
        out["tlq_report.json"] = comparable_report_bytes(out["tlq_report.json"])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private redis-server on a free port (no persistence), so flushes touch nobody else."""

    def __init__(self, password: str | None = None):
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed")
        self.port = free_port()
        auth = ["--requirepass", password] if password else []
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no",
                                      "--bind", "127.0.0.1", *auth], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.url = f"redis://{f':{password}@' if password else ''}127.0.0.1:{self.port}/0"
        import redis

        self.client = redis.Redis.from_url(self.url)
        for _ in range(100):
            try:
                self.client.ping()
                return
            except Exception:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def redis_server():
    """A private redis-server for one test module (import this fixture into the module)."""
    server = RedisServer()
    yield server
    server.stop()


def as_broker(server: "RedisServer"):
    """Point this process's worker app (dispatch, heartbeats, notes) at `server` while the generator runs:
    the body of a fixture, `yield from as_broker(server)`."""
    from worker import app as worker_app

    previous = worker_app.app.conf.broker_url
    worker_app.use_broker(server.url)
    try:
        yield server
    finally:
        worker_app.use_broker(previous)
        server.stop()


def farm_env(redis_url: str, s3_endpoint: str | None, stores: str = "s3://tlq-farm-test", **extra) -> dict:
    """Worker environment; `stores`: the stores the workers serve (every test prefix lies below it)."""
    env = dict(os.environ, TLQ_BROKER_URL=redis_url, TLQ_TORCH_THREADS="1", TLQ_HEARTBEAT_S="0.5",
               TLQ_ADVANCE_EVERY="3", TLQ_RUNNING_TTL="3", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               TLQ_ALLOWED_STORES=stores)
    if s3_endpoint:
        env["AWS_ENDPOINT_URL"] = s3_endpoint
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_worker(env: dict, log: Path, max_memory: str | None = None) -> subprocess.Popen:
    argv = [str(Path(sys.executable).parent / "tlq-farm"), "worker", "--loglevel", "WARNING"]
    if max_memory:
        argv += ["--max-memory", max_memory]
    return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
