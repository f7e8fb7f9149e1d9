"""The worker's local object cache: hits only for the committed digest, never stale, bounded in size."""

import logging
import os
import socket

import pytest
from s3_server import moto_s3, s3_store_factory  # noqa: F401  (fixtures)

from tlq_farm.store import CorruptObject, LocalStore, NotCommitted
from tlq_farm.store.base import sha256_hex
from worker.cache import CachedStore


def test_written_objects_are_served_locally_and_rewrites_are_never_stale(tmp_path):
    store = LocalStore(tmp_path / "store")
    cached = CachedStore(store, tmp_path / "cache", max_bytes=1 << 20)
    cached.put_bytes("a/x", b"one")
    assert cached.get_bytes("a/x") == b"one" and (cached.hits, cached.misses) == (1, 0)
    store.put_bytes("a/x", b"two")  # another worker rewrites the key
    assert cached.get_bytes("a/x") == b"two" and cached.misses == 1
    assert cached.get_bytes("a/x") == b"two" and cached.hits == 2
    store.put_bytes("a/y", b"one")  # same bytes under another key: the same cache entry...
    assert cached.get_bytes("a/y") == b"one" and (cached.hits, cached.misses) == (2, 2)  # ...once a/y is checked
    assert cached.get_bytes("a/y") == b"one" and cached.hits == 3


def test_a_damaged_cache_file_is_fetched_again(tmp_path):
    store = LocalStore(tmp_path / "store")
    cached = CachedStore(store, tmp_path / "cache", max_bytes=1 << 20)
    digest = cached.put_bytes("k", b"payload")
    (tmp_path / "cache" / digest[:2] / digest).write_bytes(b"garbage")
    assert cached.get_bytes("k") == b"payload" and cached.misses == 1


def test_a_cache_file_damaged_after_a_verified_hit_is_fetched_again(tmp_path):
    # Hits on an unchanged file skip the hash; a file rewritten since (same size, new bytes) is hashed again.
    store = LocalStore(tmp_path / "store")
    cached = CachedStore(store, tmp_path / "cache", max_bytes=1 << 20)
    digest = cached.put_bytes("k", b"payload")
    for n in (1, 2):
        assert cached.get_bytes("k") == b"payload" and (cached.hits, cached.misses) == (n, 0)
    cached_file = tmp_path / "cache" / digest[:2] / digest
    before = cached_file.stat().st_mtime_ns
    cached_file.write_bytes(b"PAYLOAD")
    os.utime(cached_file, ns=(before + 10**9, before + 10**9))  # a later write, even on a coarse clock
    assert cached.get_bytes("k") == b"payload" and cached.misses == 1
    assert cached_file.read_bytes() == b"payload"  # the fetched bytes took the damaged entry's place


def test_the_cache_stays_within_its_size(tmp_path):
    store = LocalStore(tmp_path / "store")
    cached = CachedStore(store, tmp_path / "cache", max_bytes=2500)
    for i in range(6):
        cached.put_bytes(f"k{i}", bytes([i]) * 1000)
    files = [p for p in (tmp_path / "cache").glob("*/*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 2500 and len(files) == 2
    assert cached.get_bytes("k0") == bytes([0]) * 1000  # evicted: read from the store
    assert cached.misses == 1


# A corrupted store object behind a cache hit: found by the version check, and committed again from the
# verified cached copy, so that the next reader of the store gets the committed bytes.

PAYLOAD = bytes(range(256)) * 40


def _raw_put(store, key, data):
    """Overwrite the object's bytes in the bucket, behind the commit protocol's back."""
    store.client.put_object(Bucket=store.bucket, Key=store._full(key), Body=data)


STAGED = "jobs/j/staged/block-000.safetensors"


def test_a_corrupted_s3_object_behind_a_cache_hit_is_found_and_repaired(s3_store_factory, tmp_path):
    """A staged object (no task can compute it again) is checked against the store on every hit."""
    store = s3_store_factory()
    cached = CachedStore(store, tmp_path / "cache", max_bytes=1 << 20)
    cached.put_bytes(STAGED, PAYLOAD)
    assert cached.get_bytes(STAGED) == PAYLOAD and cached.hits == 1
    garbage = bytes(b ^ 0x5A for b in PAYLOAD)  # same size: only the content check can see it
    _raw_put(store, STAGED, garbage)
    assert cached.get_bytes(STAGED) == PAYLOAD
    assert (cached.hits, cached.repairs) == (1, 1)
    assert store.get_bytes(STAGED) == PAYLOAD  # the bucket holds the committed bytes again
    assert cached.get_bytes(STAGED) == PAYLOAD and cached.hits == 2  # and hits resume


def test_a_tasks_output_is_served_by_its_marker_alone_and_damage_is_left_to_the_next_store_read(
        s3_store_factory, tmp_path):
    """A task's output hits on its marker's digest with no look at the store's object: the cached bytes are
    the committed content. Damage behind it stays for a reader of the store to find (which deletes the
    object, so that the task that wrote it runs again), and costs this cache nothing."""
    store = s3_store_factory()
    cached = CachedStore(store, tmp_path / "cache", max_bytes=1 << 20)
    cached.put_bytes("jobs/j/acts/x", PAYLOAD)
    _raw_put(store, "jobs/j/acts/x", bytes(b ^ 0x5A for b in PAYLOAD))
    ops = _operations(store)
    assert cached.get_bytes("jobs/j/acts/x") == PAYLOAD and ops == ["GetObject"]
    assert cached.get_file("jobs/j/acts/x", tmp_path / "x").read_bytes() == PAYLOAD
    assert (cached.hits, cached.misses, cached.repairs) == (2, 0, 0)
    with pytest.raises(CorruptObject):
        store.get_bytes("jobs/j/acts/x")
    assert not store.is_committed("jobs/j/acts/x")
    with pytest.raises(NotCommitted):  # and no cache serves what is no longer committed
        cached.get_bytes("jobs/j/acts/x")


def test_an_s3_object_missing_behind_its_marker_is_committed_again_from_the_cache(s3_store_factory, tmp_path):
    store = s3_store_factory()
    cached = CachedStore(store, tmp_path / "cache", max_bytes=1 << 20)
    cached.put_bytes("jobs/j/calib/s", PAYLOAD)
    store.client.delete_object(Bucket=store.bucket, Key=store._full("jobs/j/calib/s"))
    assert cached.get_bytes("jobs/j/calib/s") == PAYLOAD and cached.repairs == 1
    assert store.get_bytes("jobs/j/calib/s") == PAYLOAD


def test_an_identical_rewrite_on_s3_keeps_the_cache_hit(s3_store_factory, tmp_path):
    store = s3_store_factory()
    cached = CachedStore(store, tmp_path / "cache", max_bytes=1 << 20)
    cached.put_bytes("k", PAYLOAD)
    store.put_bytes("k", PAYLOAD)  # a duplicate task: same bytes, same ETag
    assert cached.get_bytes("k") == PAYLOAD and (cached.hits, cached.misses, cached.repairs) == (1, 0, 0)


def test_a_local_object_edited_in_place_behind_a_cache_hit_is_repaired(tmp_path):
    store = LocalStore(tmp_path / "store")
    cached = CachedStore(store, tmp_path / "cache", max_bytes=1 << 20)
    cached.put_bytes("a/x", PAYLOAD)
    with open(store.path("a/x"), "r+b") as f:  # same size, same inode: only the mtime moves
        f.seek(100)
        f.write(b"\0\0\0")
    assert cached.get_bytes("a/x") == PAYLOAD and cached.repairs == 1
    assert store.path("a/x").read_bytes() == PAYLOAD


def test_a_corrupted_object_another_key_shares_the_cache_with_is_checked_before_it_is_served(tmp_path):
    store = LocalStore(tmp_path / "store")
    cached = CachedStore(store, tmp_path / "cache", max_bytes=1 << 20)
    cached.put_bytes("a/x", PAYLOAD)
    store.put_bytes("a/y", PAYLOAD)  # written elsewhere: this cache never saw a/y's object
    store.path("a/y").write_bytes(b"garbage")
    assert cached.get_bytes("a/y") == PAYLOAD and cached.repairs == 1
    assert store.get_bytes("a/y") == PAYLOAD


def test_a_corrupted_object_with_no_cached_copy_still_raises(tmp_path):
    store = LocalStore(tmp_path / "store")
    cached = CachedStore(store, tmp_path / "cache", max_bytes=10)  # too small to keep anything
    cached.put_bytes("a/x", PAYLOAD)
    store.path("a/x").write_bytes(b"garbage")
    with pytest.raises(CorruptObject, match="deleted"):
        cached.get_bytes("a/x")
    assert not store.is_committed("a/x") and cached.repairs == 0


def test_files_are_served_from_the_cache_too_and_a_changed_object_is_downloaded(s3_store_factory, tmp_path):
    """get_file (staged pieces are read as files) hits the cache like get_bytes: by digest, and only while
    the store's object is the one this cache saw; a damaged object with no fresh copy is refused."""
    store = s3_store_factory()
    cached = CachedStore(store, tmp_path / "cache", max_bytes=1 << 20)
    store.put_bytes("jobs/j/staged/embed", PAYLOAD)
    assert cached.get_file("jobs/j/staged/embed", tmp_path / "a").read_bytes() == PAYLOAD
    assert (cached.hits, cached.misses) == (0, 1)
    before = store.bytes_read
    assert cached.get_file("jobs/j/staged/embed", tmp_path / "b").read_bytes() == PAYLOAD
    assert (cached.hits, cached.misses, cached.hit_bytes) == (1, 1, len(PAYLOAD)) and store.bytes_read == before
    store.put_bytes("jobs/j/staged/embed", PAYLOAD[::-1])  # rewritten: a new digest
    assert cached.get_file("jobs/j/staged/embed", tmp_path / "c").read_bytes() == PAYLOAD[::-1]
    assert cached.misses == 2 and store.bytes_read == before + len(PAYLOAD)
    _raw_put(store, "jobs/j/staged/embed", bytes(len(PAYLOAD)))  # damaged behind the marker
    with pytest.raises(CorruptObject):
        cached.get_file("jobs/j/staged/embed", tmp_path / "d")


def _operations(store) -> list[str]:
    """The S3 operations `store`'s client sends from now on, in order (boto3's own event hook)."""
    seen: list[str] = []
    store.client.meta.events.register("before-call.s3", lambda model, **_: seen.append(model.name))
    return seen


def test_a_write_keeps_the_version_its_put_returned_so_the_next_hit_needs_one_lookup(s3_store_factory, tmp_path):
    """The object's version (ETag and size) comes from the PUT's answer, not from a HEAD after it; it is the
    token a HEAD reads back, so the next read is a hit: its marker and one HEAD, not a download."""
    store = s3_store_factory()
    cached = CachedStore(store, tmp_path / "cache", max_bytes=1 << 20)
    ops = _operations(store)
    cached.put_bytes(STAGED, PAYLOAD)
    assert ops == ["DeleteObject", "PutObject", "PutObject"]  # marker withdrawn, object, marker
    assert store._object_version(STAGED) == cached._recorded(sha256_hex(PAYLOAD), STAGED)
    del ops[:]
    assert cached.get_bytes(STAGED) == PAYLOAD
    assert ops == ["GetObject", "HeadObject"] and (cached.hits, cached.misses, cached.repairs) == (1, 0, 0)
    del ops[:]
    cached.put_bytes("jobs/j/acts/x", PAYLOAD)  # a task's output: no version kept, none looked up
    assert cached.get_bytes("jobs/j/acts/x") == PAYLOAD
    assert ops == ["DeleteObject", "PutObject", "PutObject", "GetObject"] and cached.hits == 2
    assert store._versions_written == {}  # each write's version taken, used or not: none piles up


def test_a_prefetch_looks_up_what_a_task_reads_at_once_and_each_read_takes_its_own(s3_store_factory, tmp_path):
    """prefetch() reads the markers (and for staged objects the versions) of the objects a task reads next,
    side by side. A hit then sends no request, a miss only its download; damage to a staged object that was
    there when it looked is still found and repaired; each lookup serves one read, and forget_prefetched()
    drops the rest."""
    store = s3_store_factory()
    cached = CachedStore(store, tmp_path / "cache", max_bytes=1 << 20)
    names = [f"jobs/j/staged/block-00{i}.safetensors" for i in range(3)]
    for i, k in enumerate(names):
        cached.put_bytes(k, PAYLOAD + bytes([i]))
    output = "jobs/j/qweights/block-000/mlp.down_proj.safetensors"
    cached.put_bytes(output, PAYLOAD + b"\3")
    store.put_bytes("jobs/j/acts/x", PAYLOAD[::-1])  # another worker's output: not in this cache
    _raw_put(store, names[2], bytes(len(PAYLOAD) + 1))  # damaged behind its marker
    ops = _operations(store)
    sent = store.requests
    cached.prefetch(names + [output, "jobs/j/acts/x", "jobs/j/acts/never-written"])
    # Six markers; a version only for the three staged objects (a missing marker needs none either).
    assert sorted(ops) == ["GetObject"] * 6 + ["HeadObject"] * 3
    assert store.requests - sent == 9  # what the store counts for the task records (store_requests)
    del ops[:]
    assert [cached.get_bytes(k) for k in names[:2]] == [PAYLOAD + b"\0", PAYLOAD + b"\1"] and ops == []
    assert cached.get_bytes(output) == PAYLOAD + b"\3" and ops == []
    assert cached.get_bytes("jobs/j/acts/x") == PAYLOAD[::-1] and ops == ["GetObject"]
    assert cached.get_bytes(names[2]) == PAYLOAD + b"\2" and cached.repairs == 1
    assert store.get_bytes(names[2]) == PAYLOAD + b"\2"
    del ops[:]
    assert cached.get_bytes(names[0]) == PAYLOAD + b"\0" and ops == ["GetObject", "HeadObject"]  # taken already
    del ops[:]
    assert cached.get_bytes(output) == PAYLOAD + b"\3" and ops == ["GetObject"]
    cached.prefetch([names[1]])
    cached.forget_prefetched()
    del ops[:]
    assert cached.get_bytes(names[1]) == PAYLOAD + b"\1" and ops == ["GetObject", "HeadObject"]


def test_a_read_ahead_downloads_the_next_blocks_weights_once_so_that_their_read_is_a_hit(
        s3_store_factory, tmp_path):
    """read_ahead() brings committed objects into the cache in the background; the task's later read of one
    is then a hit (its marker and version, no download), the same bytes; each key is read ahead once per
    process; a key not committed yet is left for a later ask; what the cache holds is not downloaded."""
    store = s3_store_factory()
    cached = CachedStore(store, tmp_path / "cache", max_bytes=1 << 20)
    nxt, later = STAGED, "jobs/j/staged/block-001.safetensors"
    store.put_bytes(nxt, PAYLOAD)
    ops = _operations(store)
    before = store.bytes_read
    cached.read_ahead([nxt, later])()  # later: not staged yet
    assert sorted(ops) == ["GetObject", "GetObject", "GetObject", "HeadObject"]  # 2 markers, the version, the object
    assert cached.misses == 1 and store.bytes_read == before + len(PAYLOAD)
    assert list((tmp_path / "cache" / ".ahead").iterdir()) == []  # nothing left half-way
    del ops[:]
    assert cached.get_file(nxt, tmp_path / "block").read_bytes() == PAYLOAD
    assert ops == ["GetObject", "HeadObject"] and (cached.hits, cached.misses) == (1, 1)
    del ops[:]
    cached.read_ahead([nxt])()
    assert ops == []  # once per process
    store.put_bytes(later, PAYLOAD[::-1])
    cached.put_bytes("jobs/j/staged/embed.safetensors", PAYLOAD + b"!")  # written here: cached already
    del ops[:]
    cached.read_ahead([later, "jobs/j/staged/embed.safetensors"])()
    assert sorted(ops) == ["GetObject", "GetObject", "GetObject", "HeadObject"] and cached.misses == 2
    del ops[:]
    assert cached.get_bytes(later) == PAYLOAD[::-1] and ops == ["GetObject", "HeadObject"]


def test_a_read_ahead_that_fails_leaves_the_read_to_the_task(s3_store_factory, tmp_path, caplog):
    """A damaged object met by the read-ahead is not kept; the task's own read meets it and says so."""
    caplog.set_level(logging.INFO, logger="worker.cache")
    store = s3_store_factory()
    cached = CachedStore(store, tmp_path / "cache", max_bytes=1 << 20)
    store.put_bytes(STAGED, PAYLOAD)
    _raw_put(store, STAGED, bytes(len(PAYLOAD)))  # damaged behind its marker
    cached.read_ahead([STAGED])()
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []
    assert "read-ahead of" in caplog.text and STAGED in caplog.text
    with pytest.raises((CorruptObject, NotCommitted)):
        cached.get_file(STAGED, tmp_path / "block")


def test_what_a_killed_workers_read_ahead_left_is_removed_and_a_live_ones_kept(tmp_path):
    import subprocess
    import sys

    ahead = tmp_path / "cache" / ".ahead"
    ahead.mkdir(parents=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = ahead / f".{int(gone.stdout)}.part"
    alive = ahead / f".{os.getpid()}.part"
    for p in (dead, alive, ahead / f"..{int(gone.stdout)}.part.x1y2.part"):
        p.write_bytes(b"half")
    CachedStore(LocalStore(tmp_path / "store"), tmp_path / "cache", max_bytes=1 << 20)
    assert sorted(ahead.iterdir()) == [alive]


def test_an_object_of_more_than_a_quarter_of_the_cache_is_not_read_ahead(s3_store_factory, tmp_path):
    store = s3_store_factory()
    store.put_bytes(STAGED, PAYLOAD)
    for max_bytes, downloads in ((4 * len(PAYLOAD) - 1, 0), (4 * len(PAYLOAD), 1)):
        cached = CachedStore(store, tmp_path / f"cache-{max_bytes}", max_bytes=max_bytes)
        cached.read_ahead([STAGED])()
        assert cached.misses == downloads


def test_a_cache_grows_to_a_jobs_working_set_as_far_as_its_disk_allows(tmp_path, monkeypatch, caplog):
    """Without TLQ_CACHE_BYTES (grow) the cache's size rises to each job's working set, never above what it
    holds plus half its disk's free space; a cache left below a job's working set says so once, with the
    setting to change."""
    import shutil
    from collections import namedtuple

    caplog.set_level(logging.WARNING, logger="worker.cache")
    store = LocalStore(tmp_path / "store")
    cached = CachedStore(store, tmp_path / "cache", max_bytes=1000, grow=True)
    cached.size_cache("j", 50_000)
    cached.size_cache("j", 40_000)  # a smaller figure of the same job changes nothing
    assert cached.max_bytes == 50_000 and caplog.text == ""
    cached = CachedStore(store, tmp_path / "cache", max_bytes=20_000, grow=True)
    cached.put_bytes("jobs/j/acts/x", PAYLOAD)  # 10240 bytes held
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 60_000, 60_000))
    cached.size_cache("k", 10**6)
    assert cached.max_bytes == len(PAYLOAD) + 30_000
    assert caplog.text.count("job k: ") == 1 and "TLQ_CACHE_DIR" in caplog.text
    cached.size_cache("k", 10**6)
    assert caplog.text.count("job k: ") == 1
    fixed = CachedStore(store, tmp_path / "cache", max_bytes=1000)
    fixed.size_cache("j", 50_000)
    assert fixed.max_bytes == 1000 and "TLQ_CACHE_BYTES" in caplog.text


def test_a_block_read_through_a_cache_grown_to_its_job_downloads_nothing_twice(tmp_path, caplog):
    """A job's tasks run through a cache that grew to the job's working set (plan.cache_bytes): the tasks of
    each block download at most the next block's weights, read ahead (the rest they or the block before
    wrote), and the embed tasks the prefix once. Through a cache a third of that size the same tasks download again what they read
    or wrote a moment before, and the cache says why. The export is the same bytes."""
    from test_farm_support import job_spec, make_job_files

    from tlq_farm import plan, steps
    from tlq_farm.staging import stage_job
    from tlq_farm.store import keys

    files = make_job_files(tmp_path / "files")
    caplog.set_level(logging.WARNING, logger="worker.cache")
    misses, exports, size = {}, {}, 1
    for run in ("grown", "third"):
        store = LocalStore(tmp_path / f"store-{run}")
        job, _ = stage_job(store, job_spec(*files))
        cached = CachedStore(store, tmp_path / f"cache-{run}", max_bytes=size, grow=run == "grown")
        assert steps.run_embedded(cached, job)
        records = steps.task_records(store, job)
        misses[run] = {kind: [r["cache_misses"] for r in records if r["kind"] == kind] for kind in plan.KINDS}
        exports[run] = store.get_bytes(keys.export_file(job, "model.safetensors"))
        manifest = steps.get_json(store, keys.manifest(job))
        if run == "grown":
            assert cached.max_bytes == plan.cache_bytes(manifest, steps.get_json(store, keys.plan_groups(job)))
            size, grown = cached.max_bytes // 3, cached
            assert "job " not in caplog.text
            from tlq_farm.jobs import job_status

            assert job_status(store, job, io=True)["store_io"]["small_caches"] == []
    n_blocks, n_shards = manifest["n_blocks"], len(manifest["shards"])
    # Embed: the first task downloads the prefix (and block 0, read ahead); each other only its shard's samples.
    assert sorted(misses["grown"]["embed"])[:-1] == [1] * (n_shards - 1), misses
    # Each block's tasks: at most the next block's weights, read ahead.
    assert sum(sum(misses["grown"][k]) for k in plan.BLOCK_KINDS) <= n_blocks - 1, misses
    total = {run: sum(map(sum, m.values())) for run, m in misses.items()}
    assert total["third"] > total["grown"] + n_blocks, total
    assert f"job {job}: " in caplog.text and "TLQ_CACHE_BYTES" in caplog.text
    assert exports["grown"] == exports["third"]
    # `status` names the worker process whose cache was below the job's need, with both sizes.
    from tlq_farm.jobs import format_status, job_status
    from tlq_farm.spec import format_size

    small = job_status(store, job, io=True)["store_io"]["small_caches"]
    assert small == [{"worker": f"{socket.gethostname()}:{os.getpid()}", "cache_bytes": size,
                      "need_bytes": grown.max_bytes}]
    line = next(x for x in format_status(job_status(store, job, io=True)).splitlines() if "caches below" in x)
    assert format_size(size) in line and format_size(grown.max_bytes) in line and "TLQ_CACHE_BYTES" in line


def test_each_gpu_process_of_a_machine_has_its_own_cache_folder(tmp_path):
    """Under TLQ_CACHE_DIR (else XDG_CACHE_HOME or ~/.cache, tlq-farm), one folder per GPU and one for CPU
    workers: each process sizes its cache for its own tasks."""
    from worker.cache import cache_dir

    base = {"TLQ_CACHE_DIR": str(tmp_path)}
    folders = [cache_dir({**base, "TLQ_DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": i}) for i in ("0", "1")]
    assert folders == [tmp_path / "cuda0", tmp_path / "cuda1"]
    assert cache_dir({**base, "TLQ_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": "0"}) == tmp_path / "cpu"
    assert cache_dir({"XDG_CACHE_HOME": str(tmp_path / "xdg")}) == tmp_path / "xdg" / "tlq-farm" / "cpu"


@pytest.fixture()
def farm_redis():
    from test_farm_support import RedisServer, as_broker

    yield from as_broker(RedisServer())


def test_with_the_farms_notes_a_hit_on_a_tasks_output_sends_no_request(s3_store_factory, tmp_path, farm_redis):
    """Workers note the commits of task outputs in Redis (dispatch.KnownCommits): a hit on an output then needs
    no marker read, and a worker without a copy downloads the object alone. A note the store no longer matches
    (the output written again with other bytes and noted by no one) costs that reader a marker read and gets
    the committed bytes; staged objects keep their marker and version checks; without Redis the notes are
    skipped, not an error."""
    from worker.dispatch import KnownCommits

    store = s3_store_factory()
    a = CachedStore(store, tmp_path / "a", 1 << 20, known=KnownCommits(store.url))
    b = CachedStore(store, tmp_path / "b", 1 << 20, known=KnownCommits(store.url))
    out = "jobs/j/qweights/block-000/mlp.down_proj.safetensors"
    a.put_bytes(out, PAYLOAD)
    ops = _operations(store)
    assert a.get_bytes(out) == PAYLOAD and ops == []
    assert b.get_bytes(out) == PAYLOAD and ops == ["GetObject"]  # the object itself: no marker
    assert b.get_file(out, tmp_path / "x").read_bytes() == PAYLOAD and ops == ["GetObject"]  # now a hit
    b.prefetch([out])
    assert ops == ["GetObject"]
    store.put_bytes("jobs/j/acts/y", PAYLOAD[::-1])  # written by a process without notes
    del ops[:]
    assert a.get_bytes("jobs/j/acts/y") == PAYLOAD[::-1] and ops == ["GetObject", "GetObject"]  # marker, object
    store.put_bytes(out, PAYLOAD[:100])  # written again, other bytes, unnoted: a's note is stale
    c = CachedStore(store, tmp_path / "c", 1 << 20, known=KnownCommits(store.url))
    del ops[:]
    assert c.get_bytes(out) == PAYLOAD[:100]
    # The object (other bytes than noted), its marker (changed: a rewrite), then the read again: marker, object.
    assert ops == ["GetObject"] * 4
    a.put_bytes(STAGED, PAYLOAD)
    del ops[:]
    # Never noted: its marker and version, then (a version b never saw) the verifying read.
    assert b.get_bytes(STAGED) == PAYLOAD and ops == ["GetObject", "HeadObject", "HeadObject", "GetObject", "GetObject"]
    farm_redis.stop()
    d = CachedStore(store, tmp_path / "d", 1 << 20, known=KnownCommits(store.url))
    d.put_bytes("jobs/j/acts/z", PAYLOAD)
    del ops[:]
    assert d.get_bytes("jobs/j/acts/z") == PAYLOAD and ops == ["GetObject"]  # the marker, as without notes
