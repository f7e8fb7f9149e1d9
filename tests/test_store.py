"""The store layer against a folder and against a real HTTP S3 endpoint (moto's server)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import time

import pytest
import torch
from s3_server import free_port, moto_s3, s3_store_factory  # noqa: F401  (fixtures)

from tlq_farm.store import CorruptObject, LocalStore, NotCommitted, StoreError, StoreUnavailable, keys, open_store
from tlq_farm.store.s3 import MiB, S3Store
from tlq_farm.store.tensors import (
    get_json,
    get_tensors,
    get_tensors_metadata,
    put_json,
    put_tensors,
    tensors_to_bytes,
)

JOB = "job-1"


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return request.getfixturevalue("s3_store_factory")()


def tamper_raw(store, raw_key: str, data: bytes | None) -> None:
    """Change a raw object behind the store's back: write the file / a plain boto3 put (None: delete)."""
    if isinstance(store, LocalStore):
        path = store.root / raw_key
        if data is None:
            path.unlink()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    else:
        full = f"{store.prefix}/{raw_key}" if store.prefix else raw_key
        if data is None:
            store.client.delete_object(Bucket=store.bucket, Key=full)
        else:
            store.client.put_object(Bucket=store.bucket, Key=full, Body=data)


def raw_bytes(store, raw_key: str) -> bytes:
    """A raw object read behind the store's back (the file / a plain boto3 get)."""
    if isinstance(store, LocalStore):
        return (store.root / raw_key).read_bytes()
    full = f"{store.prefix}/{raw_key}" if store.prefix else raw_key
    return store.client.get_object(Bucket=store.bucket, Key=full)["Body"].read()


def raw_exists(store, raw_key: str) -> bool:
    if isinstance(store, LocalStore):
        return (store.root / raw_key).exists()
    full = f"{store.prefix}/{raw_key}" if store.prefix else raw_key
    listed = store.client.list_objects_v2(Bucket=store.bucket, Prefix=full).get("Contents", [])
    return any(item["Key"] == full for item in listed)


# ---------------------------------------------------------------------------------------- commit protocol


def test_round_trip_and_overwrite(store):
    key = keys.staged_block(JOB, 3)
    data = os.urandom(1000)
    assert not store.is_committed(key)
    digest = store.put_bytes(key, data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert store.is_committed(key)
    assert store.get_bytes(key) == data
    store.put_bytes(key, b"second version")
    assert store.get_bytes(key) == b"second version"
    store.put_bytes(keys.report(JOB), b"")
    assert store.get_bytes(keys.report(JOB)) == b""


def test_the_marker_holds_the_checksum_and_is_the_only_companion(store):
    key = keys.acts(JOB, "q", 0, 1)
    data = b"activations" * 100
    digest = store.put_bytes(key, data)
    assert not raw_exists(store, keys.checksum_key(key))  # one write per commit besides the object
    marker = json.loads(raw_bytes(store, keys.marker_key(key)))
    assert set(marker) == {"sha256", "size", "time"}
    assert marker["sha256"] == hashlib.sha256(data).hexdigest()
    assert marker["size"] == len(data)
    info = store.commit_info(key)
    assert (info.sha256, info.size) == (digest, len(data))


def test_corrupted_object_is_detected_deleted_and_recomputable(store):
    key = keys.stats(JOB, 2, 1, 7)
    store.put_bytes(key, b"A" * 4096)
    tamper_raw(store, key, b"A" * 4095 + b"B")
    with pytest.raises(CorruptObject, match=r"stats/block-002/group-01/shard-0007\.safetensors.*deleted"):
        store.get_bytes(key)
    assert not store.is_committed(key)
    assert not store.exists_raw(key)
    assert not raw_exists(store, keys.checksum_key(key))
    with pytest.raises(NotCommitted):
        store.get_bytes(key)
    store.put_bytes(key, b"recomputed")
    assert store.get_bytes(key) == b"recomputed"


def test_missing_object_under_marker_is_corrupt(store):
    key = keys.grads(JOB, 1, 0)
    store.put_bytes(key, b"gradient")
    tamper_raw(store, key, None)
    with pytest.raises(CorruptObject, match="object is missing"):
        store.get_bytes(key)
    assert not store.is_committed(key)


def test_damaged_marker_is_corrupt(store):
    key = keys.token_weights(JOB, 1, 0)
    store.put_bytes(key, b"weights")
    tamper_raw(store, keys.marker_key(key), b"{not json")
    with pytest.raises(CorruptObject, match="marker is damaged"):
        store.get_bytes(key)
    assert not store.exists_raw(key)


def test_object_without_marker_is_not_trusted(store, tmp_path):
    key = keys.qweights(JOB, 0, "self_attn.q_proj")
    tamper_raw(store, key, b"complete-looking bytes")
    assert store.exists_raw(key)
    assert not store.is_committed(key)
    with pytest.raises(NotCommitted, match=r"qweights/block-000/self_attn\.q_proj\.safetensors.*not committed"):
        store.get_bytes(key)
    with pytest.raises(NotCommitted):
        store.get_file(key, tmp_path / "unused")
    assert not (tmp_path / "unused").exists()


def test_list_committed_ignores_uncommitted_and_other_jobs(store):
    for shard in (2, 0, 1):
        store.put_bytes(keys.acts(JOB, "q", 4, shard), b"x")
    tamper_raw(store, keys.acts(JOB, "q", 4, 3), b"uncommitted")
    store.put_flag(keys.cancel_flag(JOB))
    store.put_bytes(keys.spec("job-10"), b"{}")  # job-1 is a string prefix of job-10
    expected = [keys.acts(JOB, "q", 4, shard) for shard in (0, 1, 2)]
    assert store.list_committed(keys.acts_prefix(JOB, "q", 4)) == expected
    assert store.list_committed(keys.acts_prefix(JOB, "q", 4) + "shard-000") == expected
    assert store.list_committed(keys.job_prefix(JOB)) == expected
    assert store.list_committed(keys.acts_prefix(JOB, "fp", 4)) == []
    assert store.list_committed("") == [*expected, keys.spec("job-10")]


def test_delete_and_delete_prefix(store):
    a, b = keys.staged_block(JOB, 0), keys.staged_head(JOB)
    store.put_bytes(a, b"a")
    store.put_bytes(b, b"b")
    store.put_bytes(keys.spec("job-10"), b"{}")
    store.delete(a)
    assert not raw_exists(store, a) and not raw_exists(store, keys.marker_key(a))
    assert not raw_exists(store, keys.checksum_key(a))
    assert store.list_committed(keys.staged_prefix(JOB)) == [b]
    store.put_flag(keys.cancel_flag(JOB))
    store.delete_prefix(keys.job_prefix(JOB))
    assert store.list_committed("") == [keys.spec("job-10")]
    assert not store.exists_raw(keys.cancel_flag(JOB))
    store.delete(a)  # deleting what is gone is fine


def test_flags(store):
    flag = keys.cancel_flag(JOB)
    assert not store.exists_raw(flag)
    assert store.get_flag(flag) is None
    assert store.get_flag_json(flag, default="absent") == "absent"
    store.put_flag(flag, {"reason": "user", "at": 1})
    assert store.exists_raw(flag)
    assert store.get_flag(flag) == b'{"at": 1, "reason": "user"}'
    assert store.get_flag_json(flag) == {"at": 1, "reason": "user"}
    assert not store.is_committed(flag)
    store.put_flag(flag, b"\x00raw")
    assert store.get_flag(flag) == b"\x00raw"
    with pytest.raises(StoreError, match="not JSON"):
        store.get_flag_json(flag)
    store.delete_flag(flag)
    assert not store.exists_raw(flag)


def test_s3_lookups_are_ranged_gets_not_listings(s3_store_factory):
    """is_committed and exists_raw ask S3 for one byte of the object (a listing costs 12.5 x a GET on S3):
    an empty flag, an object, a marker, and a missing key each answered by one GetObject."""
    store = s3_store_factory()
    calls: list[str] = []
    store.client.meta.events.register("before-call.s3", lambda model, **kw: calls.append(model.name))
    flag, key = keys.cancel_flag(JOB), keys.spec(JOB)
    store.put_flag(flag, b"")
    store.put_bytes(key, b"x" * 5000)
    calls.clear()
    assert store.exists_raw(flag) and store.exists_raw(key) and store.is_committed(key)
    assert not store.exists_raw(keys.cancel_flag("job-9")) and not store.is_committed(keys.spec("job-9"))
    assert calls == ["GetObject"] * 5


def test_put_file_get_file(store, tmp_path):
    source = tmp_path / "source.bin"
    data = os.urandom(300_000)
    source.write_bytes(data)
    key = keys.export_file(JOB, "model.safetensors")
    assert store.put_file(key, source) == hashlib.sha256(data).hexdigest()
    target = tmp_path / "out" / "model.safetensors"
    assert store.get_file(key, target) == target
    assert target.read_bytes() == data
    assert store.get_bytes(key) == data
    assert [p.name for p in target.parent.iterdir()] == ["model.safetensors"]


def test_corrupted_file_is_detected_on_get_file(store, tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"z" * 50_000)
    key = keys.export_file(JOB, "config.json")
    store.put_file(key, source)
    tamper_raw(store, key, b"y" * 50_000)
    out = tmp_path / "out"
    with pytest.raises(CorruptObject, match="config.json"):
        store.get_file(key, out / "config.json")
    assert list(out.iterdir()) == []  # neither the target nor a partial file
    assert not store.is_committed(key)


def test_put_file_of_missing_path_says_so(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a file"):
        store.put_file(keys.report(JOB), tmp_path / "nope")


# ---------------------------------------------------------------------------------------- local store


def test_local_store_leaves_no_temporaries_and_refuses_escapes(tmp_path):
    store = LocalStore(tmp_path / "s")
    store.put_bytes(keys.spec(JOB), b"{}")
    names = sorted(p.relative_to(store.root).as_posix() for p in store.root.rglob("*") if p.is_file())
    assert [n for n in names if not n.startswith(".locks/")] == [
        "jobs/job-1/spec.json",
        "jobs/job-1/spec.json.commit",
    ]
    for bad in ("../escape", "/abs/path", "a//b", ".hidden", "a/./b"):
        with pytest.raises(ValueError, match="store key"):
            store.put_bytes(bad, b"x")


def _payload(writer: int, round_: int, size: int) -> bytes:
    """Distinct bytes per (writer, round) whose integrity can be checked from their own header."""
    header = f"{writer:04d}:{round_:04d}:".encode()
    block = hashlib.sha256(header).digest()
    return header + block * ((size - len(header)) // len(block))


def _payload_is_whole(data: bytes, size: int) -> bool:
    writer, round_ = (int(part) for part in data[:10].decode().split(":")[:2])
    return data == _payload(writer, round_, size)


def _write_rounds(root, key, writer, rounds, size, barrier):
    store = LocalStore(root)
    barrier.wait()
    for round_ in range(rounds):
        store.put_bytes(key, _payload(writer, round_, size))


def _read_rounds(root, key, rounds, size, barrier, results):
    store = LocalStore(root)
    barrier.wait()
    bad = []
    for _ in range(rounds):
        try:
            data = store.get_bytes(key)
            if not _payload_is_whole(data, size):
                bad.append("torn or mixed bytes")
        except StoreError as error:
            bad.append(repr(error))
    results.put(bad)


def test_concurrent_writers_of_one_key_never_leave_a_torn_object(tmp_path):
    root, key, size, rounds, writers = tmp_path / "s", keys.staged_block(JOB, 1), 300_000, 12, 3
    store = LocalStore(root)
    store.put_bytes(key, _payload(99, 0, size))
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(writers + 1)
    results = context.Queue()
    processes = [
        context.Process(target=_write_rounds, args=(root, key, w, rounds, size, barrier)) for w in range(writers)
    ]
    processes.append(context.Process(target=_read_rounds, args=(root, key, 3 * rounds, size, barrier, results)))
    for process in processes:
        process.start()
    reader_problems = results.get(timeout=120)
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    assert reader_problems == []
    final = store.get_bytes(key)  # verifies sha256 against the marker
    assert _payload_is_whole(final, size) and final[:4] != b"0099"
    assert store.commit_info(key).sha256 == hashlib.sha256(final).hexdigest()
    leftovers = [p.name for p in (root / "jobs/job-1/staged").iterdir() if p.name.startswith(".")]
    assert leftovers == []


# ---------------------------------------------------------------------------------------- S3 specifics


def test_s3_multipart_upload_round_trip(s3_store_factory, tmp_path):
    store = s3_store_factory(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    source = tmp_path / "big.bin"
    data = os.urandom(6 * MiB)
    source.write_bytes(data)
    key = keys.staged_embed(JOB)
    store.put_file(key, source)
    head = store.client.head_object(Bucket=store.bucket, Key=f"{store.prefix}/{key}")
    assert head["ETag"].strip('"').endswith("-2")  # two parts: 5 MiB + 1 MiB
    assert store.get_file(key, tmp_path / "back.bin").read_bytes() == data
    assert store.commit_info(key).size == 6 * MiB


def test_s3_store_lives_under_its_prefix(s3_store_factory):
    store = s3_store_factory(prefix="team/a")
    store.put_bytes(keys.spec(JOB), b"{}")
    listed = store.client.list_objects_v2(Bucket=store.bucket)["Contents"]
    assert sorted(item["Key"] for item in listed) == [
        "team/a/jobs/job-1/spec.json",
        "team/a/jobs/job-1/spec.json.commit",
    ]
    assert store.url == f"s3://{store.bucket}/team/a"


def test_s3_endpoint_down_raises_store_unavailable(moto_s3):
    port = free_port()
    store = S3Store("bucket", "p", endpoint_url=f"http://127.0.0.1:{port}", connect_timeout=1, max_attempts=1)
    with pytest.raises(StoreUnavailable, match=rf"127\.0\.0\.1:{port}.*AWS_ENDPOINT_URL"):
        store.put_bytes(keys.spec(JOB), b"{}")
    with pytest.raises(StoreUnavailable, match="cannot be reached"):
        store.list_committed("")


def test_s3_missing_bucket_raises_store_unavailable(moto_s3):
    store = S3Store("no-such-bucket-here", "", endpoint_url=moto_s3, max_attempts=1)
    with pytest.raises(StoreUnavailable, match="'no-such-bucket-here' does not exist.*ensure_bucket"):
        store.get_bytes(keys.spec(JOB))
    with pytest.raises(StoreUnavailable, match="does not exist"):
        store.is_committed(keys.spec(JOB))
    store.ensure_bucket()
    store.ensure_bucket()  # idempotent
    assert not store.is_committed(keys.spec(JOB))


# ---------------------------------------------------------------------------------------- open_store


def test_open_store(tmp_path, monkeypatch, moto_s3):
    monkeypatch.setenv("HOME", str(tmp_path))
    local = open_store("~/runs")
    assert isinstance(local, LocalStore) and local.root == (tmp_path / "runs").resolve()
    assert local.root.is_dir()
    assert open_store("file://" + str(tmp_path / "other")).root == (tmp_path / "other").resolve()
    assert open_store(local.url).root == local.root
    remote = open_store("s3://my-bucket/some/prefix/", endpoint_url=moto_s3)
    assert isinstance(remote, S3Store)
    assert (remote.bucket, remote.prefix, remote.url) == ("my-bucket", "some/prefix", "s3://my-bucket/some/prefix")
    for bad in ("s3://", "s3:///prefix"):
        with pytest.raises(ValueError, match="names no bucket"):
            open_store(bad)
    with pytest.raises(ValueError, match="unsupported scheme"):
        open_store("gs://bucket")


# ---------------------------------------------------------------------------------------- tensors, JSON


def test_tensor_bytes_are_deterministic_and_round_trip(store):
    tensors = {
        "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "codes": torch.tensor([[1, 15], [0, 7]], dtype=torch.int32),
        "scale": torch.tensor([0.5, 1.5], dtype=torch.bfloat16),
        "h": torch.eye(3, dtype=torch.float64),
    }
    metadata = {"z": "1", "a": "2", "m": "3", "block": "4", "q": "5", "b": "6"}
    reordered = dict(reversed(list(tensors.items())))
    reordered_metadata = dict(reversed(list(metadata.items())))
    variants = {tensors_to_bytes(tensors, metadata) for _ in range(12)}
    variants.add(tensors_to_bytes(reordered, reordered_metadata))
    assert len(variants) == 1
    key = keys.stats(JOB, 0, 0, 0)
    digest = put_tensors(store, key, tensors, metadata)
    assert digest == hashlib.sha256(variants.pop()).hexdigest()
    back = get_tensors(store, key)
    assert sorted(back) == sorted(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor)
    assert get_tensors_metadata(store, key) == metadata


def test_large_objects_go_through_a_file_and_are_the_same_bytes(store, monkeypatch):
    """Above LARGE_BYTES put_tensors writes a file and fixes its header in place, and reads go one tensor at
    a time from a file: the stored bytes and what comes back are those of the in-memory path."""
    from tlq_farm.store import tensors as T
    from tlq_farm.store.tensors import get_tensors_and_metadata

    tensors = {"b|H": torch.randn(16, 16), "a|H": torch.randn(16, 16).double(), "a|tokens": torch.tensor(7),
               "view": torch.arange(4.0), "half": torch.randn(3, 5).bfloat16(), "codes": torch.arange(6, dtype=torch.uint8),
               "flag": torch.tensor([True, False]), "empty": torch.zeros(0, 2)}
    tensors["alias"] = tensors["view"][:2]
    metadata = {"tlq": "{}", "b": "x"}
    small = put_tensors(store, keys.stats(JOB, 0, 0, 0), tensors, metadata)
    monkeypatch.setattr(T, "LARGE_BYTES", 64)
    large = put_tensors(store, keys.stats(JOB, 0, 0, 1), tensors, metadata)
    assert large == small == hashlib.sha256(tensors_to_bytes(tensors, metadata)).hexdigest()
    back, meta = get_tensors_and_metadata(store, keys.stats(JOB, 0, 0, 1))
    assert meta == metadata and sorted(back) == sorted(tensors)
    assert all(torch.equal(back[n], t) for n, t in tensors.items())
    assert all(torch.equal(get_tensors(store, keys.stats(JOB, 0, 0, 1))[n], t) for n, t in tensors.items())
    with pytest.raises(TypeError, match="metadata must map str to str"):
        put_tensors(store, keys.stats(JOB, 0, 0, 2), tensors, {"n": 1})


def test_tensors_sharing_memory_and_bad_metadata(tmp_path):
    base = torch.arange(8.0)
    data = tensors_to_bytes({"all": base, "view": base[:4]})
    assert data == tensors_to_bytes({"all": base.clone(), "view": base[:4].clone()})
    with pytest.raises(TypeError, match="metadata must map str to str"):
        tensors_to_bytes({"a": base}, {"bits": 4})


def test_json_is_deterministic(store):
    value = {"b": [1, 2.5, None], "a": {"y": "é", "x": True}}
    key = keys.manifest(JOB)
    first = put_json(store, key, value)
    assert put_json(store, key, {"a": {"x": True, "y": "é"}, "b": [1, 2.5, None]}) == first
    assert get_json(store, key) == value
    assert store.get_bytes(key).startswith(b'{\n  "a": {')
    with pytest.raises(ValueError, match="NaN"):
        put_json(store, key, {"loss": float("nan")})


# ---------------------------------------------------------------------------------------- key layout


def test_key_layout():
    assert keys.jobs_prefix() == "jobs/"
    assert keys.job_prefix("ab-1") == "jobs/ab-1/"
    assert keys.spec(JOB) == "jobs/job-1/spec.json"
    assert keys.manifest(JOB) == "jobs/job-1/manifest.json"
    assert keys.calib_shard(JOB, 42) == "jobs/job-1/calib/shard-0042.safetensors"
    assert keys.staged_prefix(JOB) == "jobs/job-1/staged/"
    assert keys.staged_embed(JOB) == "jobs/job-1/staged/embed.safetensors"
    assert keys.staged_block(JOB, 3) == "jobs/job-1/staged/block-003.safetensors"
    assert keys.staged_head(JOB) == "jobs/job-1/staged/head.safetensors"
    assert keys.acts(JOB, "fp", 3, 1) == "jobs/job-1/acts/fp/block-003/shard-0001.safetensors"
    assert keys.grads(JOB, 3, 1) == "jobs/job-1/grads/block-003/shard-0001.safetensors"
    assert keys.token_weights(JOB, 3, 1) == "jobs/job-1/token_weights/block-003/shard-0001.safetensors"
    assert keys.stats(JOB, 3, 2, 1) == "jobs/job-1/stats/block-003/group-02/shard-0001.safetensors"
    assert keys.qweights(JOB, 3, "mlp.down_proj") == "jobs/job-1/qweights/block-003/mlp.down_proj.safetensors"
    assert keys.block_done(JOB, 3) == "jobs/job-1/done/block-003.json"
    assert keys.export_prefix(JOB) == "jobs/job-1/export/"
    assert keys.export_file(JOB, "model.safetensors") == "jobs/job-1/export/model.safetensors"
    assert keys.report(JOB) == "jobs/job-1/report.json"
    assert keys.cancel_flag(JOB) == "jobs/job-1/cancel"
    assert keys.task_log(JOB, "stats-b003-g02-s0001") == "jobs/job-1/tasks/stats-b003-g02-s0001.json"
    numeric = [keys.acts(JOB, "q", b, s) for b in (0, 2, 10, 100) for s in (0, 9, 10, 1000)]
    assert sorted(numeric) == numeric
    for name in (
        "spec", "manifest", "calib_shard", "staged_prefix", "staged_block", "staged_head", "staged_embed",
        "acts", "grads", "token_weights", "stats", "qweights", "block_done", "export_prefix", "export_file",
        "report", "cancel_flag", "task_log", "job_prefix",
    ):  # every job key lives under the job's prefix
        function = getattr(keys, name)
        arguments = {"calib_shard": (1,), "staged_block": (1,), "acts": ("q", 1, 1), "grads": (1, 1),
                     "token_weights": (1, 1), "stats": (1, 1, 1), "qweights": (1, "m"), "block_done": (1,),
                     "export_file": ("f",), "task_log": ("t",)}.get(name, ())
        assert function(JOB, *arguments).startswith(keys.job_prefix(JOB))
        assert keys.job_of(function(JOB, *arguments)) == (None if name == "job_prefix" else JOB)
    assert [keys.job_of(k) for k in ("jobs/x", "jobs/Bad/a", "other/job-1/a", "jobs/job-1/")] == [None] * 4


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: keys.spec("Job"), "job id 'Job' is invalid"),
        (lambda: keys.spec("a_b"), "job id 'a_b' is invalid"),
        (lambda: keys.spec(""), "job id '' is invalid"),
        (lambda: keys.spec("-a"), "job id '-a' is invalid"),
        (lambda: keys.spec(7), "job id 7 is invalid"),
        (lambda: keys.acts(JOB, "x", 0, 0), r"activation chain must be one of \('q', 'fp', 'rtn'\)"),
        (lambda: keys.acts(JOB, "q", -1, 0), "block must be non-negative, got -1"),
        (lambda: keys.acts(JOB, "q", 0, 1.5), r"shard must be an integer, got 1.5"),
        (lambda: keys.staged_block(JOB, True), "block must be an integer, got the boolean True"),
        (lambda: keys.staged_block(JOB, 1000), "block 1000 does not fit the key layout"),
        (lambda: keys.stats(JOB, 0, 100, 0), "group 100 does not fit"),
        (lambda: keys.qweights(JOB, 0, "a/b"), "module name 'a/b' is invalid"),
        (lambda: keys.qweights(JOB, 0, "x.commit"), "module name 'x.commit' is invalid"),
        (lambda: keys.task_log(JOB, ""), "task id '' is invalid"),
        (lambda: keys.export_file(JOB, "../x"), r"export file name '\.\./x' is invalid"),
        (lambda: keys.check_key("a/b.sha256"), "reserved suffix"),
        (lambda: keys.check_prefix("/abs"), "must be relative"),
    ],
)
def test_key_validation_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------------------- rewrite races


class RewriteDuringRead(LocalStore):
    """A folder store without read locks (as on S3) where another writer acts between the reader's
    marker read and object read: `interleave(writer)` runs once, just before the object is read."""

    def __init__(self, root, interleave):
        super().__init__(root)
        self.interleave = interleave

    def _read_guard(self, key):
        return contextlib.nullcontext()

    def _read_identified(self, raw_key):
        if self.interleave is not None and not keys.is_reserved(raw_key):
            interleave, self.interleave = self.interleave, None
            interleave(LocalStore(self.root))
        return super()._read_identified(raw_key)


def test_rewrite_between_marker_and_object_is_not_taken_for_corruption(tmp_path):
    key = keys.staged_head(JOB)
    LocalStore(tmp_path).put_bytes(key, b"old")
    reader = RewriteDuringRead(tmp_path, lambda writer: writer.put_bytes(key, b"new bytes"))
    assert reader.get_bytes(key) == b"new bytes"
    assert LocalStore(tmp_path).get_bytes(key) == b"new bytes"


def test_rewrite_in_progress_reads_as_not_committed_and_deletes_nothing(tmp_path):
    key = keys.staged_head(JOB)
    LocalStore(tmp_path).put_bytes(key, b"old")

    def start_rewrite(writer):  # the first two steps of a write: withdraw the marker, replace the object
        (writer.root / keys.marker_key(key)).unlink()
        (writer.root / key).write_bytes(b"new, not yet committed")

    reader = RewriteDuringRead(tmp_path, start_rewrite)
    with pytest.raises(NotCommitted, match="withdrawn while being read"):
        reader.get_bytes(key)
    assert (tmp_path / key).read_bytes() == b"new, not yet committed"


def test_a_folder_store_hashes_an_unchanged_file_once_and_a_changed_one_again(tmp_path, monkeypatch):
    from tlq_farm.store import local

    key = keys.staged_block(JOB, 0)
    writer = LocalStore(tmp_path)
    writer.put_bytes(key, b"weights" * 1000)
    hashed = []
    real = local.sha256_hex
    monkeypatch.setattr(local, "sha256_hex", lambda data: hashed.append(len(data)) or real(data))
    assert writer.get_bytes(key) == b"weights" * 1000
    assert hashed == []  # the digest of its own write serves the process that wrote it
    store = LocalStore(tmp_path)  # another process, as far as the memo goes
    for _ in range(3):
        assert store.get_bytes(key) == b"weights" * 1000
    assert hashed == [7000]  # read three times, hashed once
    # Damage in place, same size: the file's identity (its mtime) changed, so it is hashed and found out,
    # by the writer too, whose memo came from its own write.
    path = store.path(key)
    time.sleep(0.01)
    path.write_bytes(b"Weights" + b"weights" * 999)
    with pytest.raises(CorruptObject):
        writer.get_bytes(key)
    assert hashed == [7000, 7000]
