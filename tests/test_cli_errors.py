"""Bad command lines and unusable services: one line that says what is wrong and what to do, and nothing
left behind that a later run would trust.

The table runs each case through the real CLI against real parts: a folder store with a staged job, moto's
S3 server over HTTP, redis-servers (one open, one with a password), and ports where nothing listens. For
every case: the exit code, no traceback, exactly one output line matching the case's pattern, and the
watched places (model and calibration bytes, the store, the case's working folder, the buckets, Redis)
exactly as they were.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from s3_server import moto_s3  # noqa: F401  (fixture)
from test_farm_support import ROOT, RedisServer, free_port, job_spec, make_job_files, redis_server  # noqa: F401

from coordinator.cli import main
from tlq_farm.staging import stage_job
from tlq_farm.store import LocalStore, NotCommitted, keys
from tlq_farm.store.local import LOCK_FOLDER, LOCK_STRIPES

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(120)

CLI = str(Path(sys.executable).parent / "tlq-farm")
TINY = ["--samples", "6", "--seq-len", "512", "--shard-tokens", "45", "--group-size", "32", "--quiet"]
PASSWORD = "s3cret-pass"
# The environment of a case starts from these: no farm configured, unless the case says otherwise.
BASE_ENV = {"TLQ_BROKER_URL": None, "TLQ_STORE_URL": None, "AWS_ENDPOINT_URL": None}


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_job_files(tmp_path_factory.mktemp("cli-errors-files"))


@pytest.fixture(scope="module")
def staged(files, tmp_path_factory):
    """(store folder, job id) of a real staged job."""
    store = LocalStore(tmp_path_factory.mktemp("cli-errors-store") / "store")
    job, _ = stage_job(store, job_spec(*files))
    return store.root, job


@pytest.fixture(scope="module")
def locked_redis():
    """A redis-server that wants PASSWORD."""
    server = RedisServer(password=PASSWORD)
    yield server.port, server.client
    server.stop()


@pytest.fixture(scope="module")
def s3_bucket(moto_s3):  # noqa: F811
    """An existing bucket of the moto endpoint."""
    from tlq_farm.store.s3 import S3Store

    S3Store("tlq-cli-errors", "", endpoint_url=moto_s3).ensure_bucket()
    return "tlq-cli-errors"


def buckets(endpoint: str) -> list[str]:
    from tlq_farm.store.s3 import _client

    return sorted(b["Name"] for b in _client(endpoint_url=endpoint, region_name="us-east-1").list_buckets()["Buckets"])


@contextlib.contextmanager
def s3_auth_on(endpoint: str):
    """moto checks credentials (and refuses the dummy ones) until the block ends."""
    def post(value: str):
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=value.encode(),
                                                      headers={"Content-Type": "text/plain"}, method="POST"),
                               timeout=10).read()
    post("0")
    try:
        yield
    finally:
        post("inf")


# ---------------------------------------------------------------------------------------------- the table


@dataclass
class Ctx:
    """What a case's command line and environment are built from."""

    tmp: Path
    model: Path
    calib: Path
    store: Path | None = None
    job: str | None = None
    s3: str | None = None
    bucket: str | None = None
    redis_url: str | None = None
    locked_port: int | None = None


@dataclass
class Case:
    id: str
    argv: Callable[[Ctx], list]
    pattern: str
    needs: tuple = ()
    env: Callable[[Ctx], dict] = field(default=lambda c: {})
    code: int = 1
    subprocess: bool = False
    around: Callable[[Ctx], contextlib.AbstractContextManager] | None = None
    hidden: Callable[[Ctx], str] | None = None  # must not appear in the output (a password)


def run_args(c: Ctx, *extra) -> list:
    return ["run", c.model, "--calib", c.calib, *TINY, *extra]


def s3_env(c: Ctx) -> dict:
    return {"AWS_ENDPOINT_URL": c.s3}


NO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None,
                  "AWS_PROFILE": None, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
                  "AWS_CONFIG_FILE": "/nonexistent/config", "AWS_EC2_METADATA_DISABLED": "true",
                  "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": None, "AWS_CONTAINER_CREDENTIALS_FULL_URI": None}
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: --device cuda is valid here")
BAD_JOB = "../../etc"
JOB_ID_PATTERN = r"^Error: job id '\.\./\.\./etc' is invalid: use 1-64 characters .*; list the jobs .*`tlq-farm jobs"

CASES = [
    # --out overlapping what the job reads or keeps: refused with or without --overwrite.
    Case("run-out-is-the-model-folder", lambda c: run_args(c, "--out", c.model, "--overwrite", "--store", c.tmp / "st",
                                                           "--create-store"),
         r"^Error: --out .* is the model folder .*: the export would overwrite it; choose an --out outside it$"),
    Case("run-out-inside-the-model-folder", lambda c: run_args(c, "--out", c.model / "w4", "--store", c.tmp / "st"),
         r"^Error: --out .*w4 lies inside the model folder .*choose an --out outside it$"),
    Case("run-out-contains-the-calibration-data", lambda c: run_args(c, "--out", c.calib.parent, "--overwrite"),
         r"^Error: --out .* contains the calibration data .*data\.jsonl: .*choose an --out outside it$"),
    Case("run-out-contains-the-model-folder", lambda c: run_args(c, "--out", c.model.parent, "--overwrite",
                                                                 "--in-memory"),
         r"^Error: --out .* contains the model folder .*choose an --out outside it$"),
    Case("run-out-is-the-store-folder", lambda c: run_args(c, "--out", c.store, "--overwrite", "--store", c.store),
         r"^Error: --out .* is the store folder .*: the export would overwrite the jobs kept there; choose an --out",
         needs=("staged",)),
    Case("run-out-inside-the-store-jobs", lambda c: run_args(c, "--out", c.store / "jobs" / "x", "--store", c.store),
         r"^Error: --out .*jobs/x lies inside the store folder .*choose an --out", needs=("staged",)),
    Case("export-out-is-the-store-folder", lambda c: ["export", c.job, "--out", c.store, "--store", c.store,
                                                      "--overwrite"],
         r"^Error: --out .* is the store folder .*choose an --out", needs=("staged",)),
    Case("export-out-contains-the-store-folder", lambda c: ["export", c.job, "--out", c.store.parent, "--store",
                                                            c.store, "--overwrite"],
         r"^Error: --out .* contains the store folder .*choose an --out", needs=("staged",)),
    # A store that is not there is named, never created; only `run --create-store` creates one.
    Case("jobs-store-folder-missing", lambda c: ["jobs", "--store", c.tmp / "nope"],
         r"^Error: store folder .*/nope does not exist: check the name \(--store / TLQ_STORE_URL\); "
         r"`tlq-farm run --create-store` creates a new store$", subprocess=True),
    Case("status-store-folder-missing", lambda c: ["status", "--store", c.tmp / "nope"],
         r"^Error: store folder .*/nope does not exist: check the name"),
    Case("prune-store-folder-missing", lambda c: ["prune", "--store", c.tmp / "nope"],
         r"^Error: store folder .*/nope does not exist: check the name"),
    Case("jobs-default-store-missing", lambda c: ["jobs"],
         r"^Error: store folder .*/tlq-runs does not exist: it is made by the first `tlq-farm run`; or pass --store"),
    Case("run-store-folder-missing", lambda c: run_args(c, "--store", c.tmp / "nope"),
         r"^Error: store folder .*/nope does not exist: check the name .*, or pass --create-store to create it$"),
    Case("status-bucket-missing", lambda c: ["status", "--store", "s3://tlq-typo-bucket/runs"],
         r"^Error: bucket 'tlq-typo-bucket' does not exist at http://127\.0\.0\.1:\d+: check the name .*"
         r"`tlq-farm run --create-store`", needs=("s3",), env=s3_env),
    Case("jobs-bucket-missing", lambda c: ["jobs", "--store", "s3://tlq-typo-bucket"],
         r"^Error: bucket 'tlq-typo-bucket' does not exist at ", needs=("s3",), env=s3_env),
    Case("cancel-bucket-missing", lambda c: ["cancel", "abc123", "--store", "s3://tlq-typo-bucket"],
         r"^Error: bucket 'tlq-typo-bucket' does not exist at ", needs=("s3",), env=s3_env),
    Case("run-bucket-missing", lambda c: run_args(c, "--store", "s3://tlq-typo-bucket/runs"),
         r"^Error: bucket 'tlq-typo-bucket' does not exist at http://.*, or pass --create-store to create it$",
         needs=("s3",), env=s3_env),
    # Job ids become store paths: anything but an id is refused before the store is touched.
    Case("status-job-id-with-dots", lambda c: ["status", BAD_JOB, "--store", c.store], JOB_ID_PATTERN,
         needs=("staged",)),
    Case("resume-job-id-with-dots", lambda c: ["resume", BAD_JOB, "--store", c.store], JOB_ID_PATTERN,
         needs=("staged",)),
    Case("cancel-job-id-with-dots", lambda c: ["cancel", BAD_JOB, "--store", c.store], JOB_ID_PATTERN,
         needs=("staged",)),
    Case("export-job-id-with-dots", lambda c: ["export", BAD_JOB, "--out", c.tmp / "out", "--store", c.store],
         JOB_ID_PATTERN, needs=("staged",)),
    # S3 that cannot be used.
    Case("status-no-credentials", lambda c: ["status", "--store", f"s3://{c.bucket}"],
         r"^Error: cannot check bucket .*: no usable AWS credentials .*; set AWS_ACCESS_KEY_ID and "
         r"AWS_SECRET_ACCESS_KEY \(or AWS_PROFILE\)$", needs=("s3",), env=lambda c: {**s3_env(c), **NO_CREDENTIALS}),
    Case("jobs-endpoint-down", lambda c: ["jobs", "--store", "s3://tlq-cli-errors"],
         r"^Error: cannot check bucket .*: the endpoint cannot be reached .*; check the endpoint URL .*AWS_ENDPOINT_URL",
         needs=("s3",), env=lambda c: {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}),
    Case("status-access-refused", lambda c: ["status", "--store", f"s3://{c.bucket}/runs"],
         r"^Error: cannot check bucket .*: access refused .*; check AWS_ACCESS_KEY_ID", needs=("s3",), env=s3_env,
         around=lambda c: s3_auth_on(c.s3)),
    Case("jobs-access-refused", lambda c: ["jobs", "--store", f"s3://{c.bucket}"],
         r"^Error: cannot check bucket .*: access refused", needs=("s3",), env=s3_env, around=lambda c: s3_auth_on(c.s3),
         subprocess=True),
    # A broker that cannot be reached or refuses the login: said before anything is staged or sent.
    Case("run-broker-unreachable", lambda c: run_args(c, "--broker", f"redis://127.0.0.1:{free_port()}/0", "--store",
                                                      c.tmp / "st", "--create-store"),
         r"^Error: cannot reach the broker redis://127\.0\.0\.1:\d+/0 \(.*Connection refused.*\): check --broker "
         r"/ TLQ_BROKER_URL"),
    Case("run-broker-wrong-password", lambda c: run_args(c, "--broker", f"redis://:wrong-{PASSWORD}@127.0.0.1:"
                                                         f"{c.locked_port}/0", "--store", c.tmp / "st",
                                                         "--create-store"),
         r"^Error: the broker redis://:\*\*\*@127\.0\.0\.1:\d+/0 refused the login \(.*\): check the password in "
         r"--broker / TLQ_BROKER_URL", needs=("locked",), hidden=lambda c: f"wrong-{PASSWORD}"),
    Case("workers-broker-unreachable", lambda c: ["workers", "--broker", f"redis://127.0.0.1:{free_port()}/0"],
         r"^Error: cannot reach the broker .*: check --broker / TLQ_BROKER_URL, and that Redis runs there",
         subprocess=True),
    Case("workers-broker-without-password", lambda c: ["workers", "--broker", f"redis://127.0.0.1:{c.locked_port}/0"],
         r"^Error: the broker redis://127\.0\.0\.1:\d+/0 refused the login \(.*\): check the password",
         needs=("locked",)),
    Case("status-broker-wrong-password", lambda c: ["status", "--store", c.store, "--broker",
                                                    f"redis://:nope@127.0.0.1:{c.locked_port}/0"],
         r"^Error: the broker redis://:\*\*\*@.* refused the login", needs=("staged", "locked")),
    Case("resume-broker-unreachable", lambda c: ["resume", c.job, "--store", c.store, "--broker",
                                                 f"redis://127.0.0.1:{free_port()}/0"],
         r"^Error: cannot reach the broker ", needs=("staged",)),
    # A device this machine does not have: refused before staging (the store is not even created).
    pytest.param(Case("run-device-cuda-without-gpu", lambda c: run_args(c, "--device", "cuda", "--store",
                                                                        c.tmp / "st", "--create-store"),
                      r"^Error: --device cuda: no CUDA GPU is usable here .*; use --device cpu"),
                 marks=NO_GPU, id="run-device-cuda-without-gpu"),
    Case("run-device-cuda-index-out-of-range", lambda c: run_args(c, "--device", "cuda:99", "--store", c.tmp / "st",
                                                                  "--create-store"),
         r"^Error: --device cuda:99: (no CUDA GPU is usable here|this machine has \d+ visible GPU)"),
    Case("run-device-unknown", lambda c: run_args(c, "--device", "gpu0"),
         r"^Error: --device 'gpu0' is not a device: use cpu, cuda or cuda:N$"),
    pytest.param(Case("resume-device-cuda-without-gpu", lambda c: ["resume", c.job, "--store", c.store, "--device",
                                                                   "cuda"],
                      r"^Error: --device cuda: no CUDA GPU is usable here", needs=("staged",)),
                 marks=NO_GPU, id="resume-device-cuda-without-gpu"),
]


def tree(root: Path) -> dict[str, str]:
    """Every file and folder under `root` -> the sha256 of its bytes ('dir' for folders)."""
    if not root.exists():
        return {}
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def invoke(argv: list, env: dict, cwd: Path, in_process: bool) -> tuple[int, str]:
    argv = [str(a) for a in argv]
    if in_process:
        result = CliRunner(env=env).invoke(main, argv)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise AssertionError(f"{argv} raised {result.exception!r}\n{result.output}")
        return result.exit_code, result.output
    full = dict(os.environ)
    for name, value in env.items():
        if value is None:
            full.pop(name, None)
        else:
            full[name] = value
    done = subprocess.run([CLI, *argv], env=full, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.stdout == "", done.stdout  # errors go to stderr, and alone
    return done.returncode, done.stderr


def case_id(case):
    return case.id if isinstance(case, Case) else None


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bad_command_line(case: Case, request, tmp_path, monkeypatch, files):
    c = Ctx(tmp=tmp_path, model=files[0], calib=files[1])
    if "staged" in case.needs:
        c.store, c.job = request.getfixturevalue("staged")
    if "s3" in case.needs:
        c.s3 = request.getfixturevalue("moto_s3")
        c.bucket = request.getfixturevalue("s3_bucket")
    if "locked" in case.needs:
        c.locked_port, locked_client = request.getfixturevalue("locked_redis")
    monkeypatch.chdir(tmp_path)  # the default store, ./tlq-runs, would land here
    watched = [files[0].parent, tmp_path] + ([c.store] if c.store else [])
    before = {str(w): tree(w) for w in watched}
    buckets_before = buckets(c.s3) if c.s3 else None

    env = {**BASE_ENV, **case.env(c)}
    with case.around(c) if case.around else contextlib.nullcontext():
        code, output = invoke(case.argv(c), env, tmp_path, in_process=not case.subprocess)

    assert code == case.code, output
    assert "Traceback" not in output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert re.search(case.pattern, lines[0]), lines[0]
    if case.hidden:
        assert case.hidden(c) not in output
    assert {str(w): tree(w) for w in watched} == before  # no folder, job, lock or export left, no byte changed
    if c.s3:
        assert buckets(c.s3) == buckets_before
    if c.locked_port:
        assert locked_client.dbsize() == 0


# ---------------------------------------------------------------------------------------------- beyond the table


def test_run_create_store_makes_the_bucket_and_stages_into_it(files, tmp_path, monkeypatch, moto_s3,  # noqa: F811
                                                               redis_server):
    monkeypatch.chdir(tmp_path)
    bucket = "tlq-cli-created"
    assert bucket not in buckets(moto_s3)
    result = CliRunner(env={**BASE_ENV, "AWS_ENDPOINT_URL": moto_s3}).invoke(
        main, [str(a) for a in run_args(Ctx(tmp_path, *files), "--store", f"s3://{bucket}/runs", "--create-store",
                                       "--broker", redis_server.url, "--detach")])
    assert result.exit_code == 0, result.output
    job = result.stdout.strip()
    assert bucket in buckets(moto_s3)
    listed = CliRunner(env={**BASE_ENV, "AWS_ENDPOINT_URL": moto_s3}).invoke(main, ["jobs", "--store",
                                                                                    f"s3://{bucket}/runs"])
    assert listed.exit_code == 0 and listed.output.startswith(f"{job}  running"), listed.output
    assert not (tmp_path / "tlq-runs").exists()  # an S3 run makes no local store


def test_every_option_of_every_command_has_help():
    import click

    missing = [f"{name} {param.opts[0]}" for name, command in main.commands.items() for param in command.params
               if isinstance(param, click.Option) and not param.help]
    assert missing == []


def test_jobs_marks_incomplete_jobs_and_prune_removes_them(staged, tmp_path):
    source, job = staged
    root = tmp_path / "store"
    shutil.copytree(source, root)
    store = LocalStore(root, create=False)
    # A staging that stopped before its last write: everything but the manifest.
    store.delete(keys.manifest(job))
    runner = CliRunner(env=BASE_ENV)

    listed = runner.invoke(main, ["jobs", "--store", str(root)])
    assert listed.exit_code == 0, listed.output
    assert re.fullmatch(rf"{job}  incomplete  staging never finished; `tlq-farm prune --store {root}` removes it\n",
                        listed.output)

    young = runner.invoke(main, ["prune", "--store", str(root)])
    assert young.exit_code == 0 and re.match(rf"kept {job}: incomplete, last written \d+s ago: its staging may "
                                             r"still be running \(pass --older-than 0", young.output), young.output
    assert store.list_raw(keys.job_prefix(job))

    pruned = runner.invoke(main, ["prune", "--store", str(root), "--older-than", "0"])
    assert pruned.output == f"removed {job}: incomplete (staging never finished)\n"
    assert store.list_raw(keys.jobs_prefix()) == []
    assert not (root / "jobs").exists() or not any((root / "jobs").iterdir())
    assert runner.invoke(main, ["jobs", "--store", str(root)]).output == f"no jobs in {root}\n"


def test_prune_cancelled_removes_only_cancelled_jobs(staged, tmp_path):
    source, job = staged
    root = tmp_path / "store"
    shutil.copytree(source, root)
    runner = CliRunner(env=BASE_ENV)
    assert runner.invoke(main, ["prune", "--store", str(root)]).output == f"nothing to prune in {root}\n"
    assert runner.invoke(main, ["prune", "--store", str(root), "--cancelled"]).output == f"nothing to prune in {root}\n"
    assert runner.invoke(main, ["cancel", job, "--store", str(root)]).exit_code == 0
    assert runner.invoke(main, ["prune", "--store", str(root)]).output == f"nothing to prune in {root}\n"
    out = runner.invoke(main, ["prune", "--store", str(root), "--cancelled"]).output
    assert out == f"removed {job}: cancelled\n"
    assert LocalStore(root, create=False).list_raw(keys.jobs_prefix()) == []


def test_lock_folder_stays_bounded(tmp_path):
    store = LocalStore(tmp_path / "s")
    for i in range(3 * LOCK_STRIPES):  # a read takes the key's lock too (and is quicker than a fsynced write)
        with pytest.raises(NotCommitted):
            store.get_bytes(keys.calib_shard("job-1", i))
    store.put_bytes(keys.calib_shard("job-1", 7), b"x")
    assert store.get_bytes(keys.calib_shard("job-1", 7)) == b"x"
    locks = list((store.root / LOCK_FOLDER).iterdir())
    assert LOCK_STRIPES // 2 < len(locks) <= LOCK_STRIPES


def test_ctrl_c_in_an_embedded_run_says_how_to_go_on(files, tmp_path):
    store = tmp_path / "store"
    argv = [CLI, *map(str, run_args(Ctx(tmp_path, *files), "--store", store, "--create-store", "--out",
                                    tmp_path / "out"))]
    # Each task waits a second first (fault injection): the interrupt lands while tasks run, however fast the
    # machine (the whole job takes about a second on a quick one, and a SIGINT after it exits by the signal).
    env = dict({k: v for k, v in os.environ.items() if k not in BASE_ENV}, TLQ_FAULT_SLEEP="*:1")
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    while not (match := re.match(r"job ([0-9a-f]+) \(staged\) in ", seen[-1] if seen else "")):
        seen.append(proc.stderr.readline())  # "job J (staged) in STORE": the tasks start after it
        assert seen[-1], "".join(seen)
    job = match.group(1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, rest
    assert "Traceback" not in rest and "Aborted!" not in rest
    assert rest.strip().splitlines()[-1] == (f"interrupted: job {job} keeps every task it finished; run the same "
                                             f"command again, or `tlq-farm resume {job} --store {store}`, to go on "
                                             "where it stopped")
    assert not (tmp_path / "out").exists()
    resumed = CliRunner(env=BASE_ENV).invoke(main, ["resume", job, "--store", str(store)])
    assert resumed.exit_code == 0 and f"job {job}: done" in resumed.output, resumed.output


def test_export_to_a_full_disk_names_the_out_folder(staged, files, tmp_path):
    """--out on a small tmpfs (in a private mount namespace): too small from the start, and filling up half way."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    disk = tmp_path / "disk"
    disk.mkdir()
    namespace = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c"]
    probe = subprocess.run([*namespace, 'mount -t tmpfs -o size=64k tmpfs "$0"', str(disk)], capture_output=True,
                           text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private namespace here: {probe.stderr.strip()}")
    source, job = staged
    root = tmp_path / "store"
    shutil.copytree(source, root)
    store = LocalStore(root, create=False)
    from tlq_farm import steps

    assert steps.run_embedded(store, job, progress=False)
    sizes = [store.commit_info(k).size for k in store.list_committed(keys.export_prefix(job))]
    page = 4096
    needed, pages = sum(sizes), sum(-(-s // page) for s in sizes)
    script = ('mount -t tmpfs -o size=$0 tmpfs "$1" && "$2" export "$3" --store "$4" --out "$1/out"; rc=$?; '
              'ls -A "$1"; exit $rc')
    sizes_to_try = [("too small", 64 * 1024)]
    fills_up = (-(-needed // page) + 1) * page  # room for the bytes, not for the pages the files take
    if pages * page > fills_up:
        sizes_to_try.append(("fills up", fills_up))
    for what, size in sizes_to_try:
        done = subprocess.run([*namespace, script, str(size), str(disk), CLI, job, str(root)], capture_output=True,
                              text=True, timeout=60, env={k: v for k, v in os.environ.items() if k not in BASE_ENV})
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert re.match(rf"Error: (no space for the export in --out {disk}/out: it needs [\d.]+ MiB and that disk has "
                        rf"[\d.]+ MiB free|the disk of --out {disk}/out filled up while writing the export); free "
                        "space there or choose another --out", lines[0]), (what, lines[0])
        assert done.stdout.strip() == "", (what, done.stdout)  # nothing left on that disk, not even a temporary


def test_eval_prints_no_path_that_is_gone(tmp_path):
    result = CliRunner(env=BASE_ENV).invoke(main, ["eval", "--limit", "1", "--max-new-tokens", "1", "--no-reference"])
    assert result.exit_code == 0, result.output
    data = next(line for line in result.output.splitlines() if line.startswith("data:"))
    assert "held-out demo scenes, drawn for this run and not kept (1 samples" in data
    assert "/tmp" not in data and "tlq-eval-" not in data
