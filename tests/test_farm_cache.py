"""The worker's local object cache: hits only for the committed digest, never stale, bounded in size."""

from tlq_farm.store import LocalStore
from worker.cache import CachedStore


def test_written_objects_are_served_locally_and_rewrites_are_never_stale(tmp_path):
    store = LocalStore(tmp_path / "store")
    cached = CachedStore(store, tmp_path / "cache", max_bytes=1 << 20)
    cached.put_bytes("a/x", b"one")
    assert cached.get_bytes("a/x") == b"one" and (cached.hits, cached.misses) == (1, 0)
    store.put_bytes("a/x", b"two")  # another worker rewrites the key
    assert cached.get_bytes("a/x") == b"two" and cached.misses == 1
    assert cached.get_bytes("a/x") == b"two" and cached.hits == 2
    store.put_bytes("a/y", b"one")  # same bytes under another key: the same cache entry
    assert cached.get_bytes("a/y") == b"one" and cached.hits == 3


def test_a_damaged_cache_file_is_fetched_again(tmp_path):
    store = LocalStore(tmp_path / "store")
    cached = CachedStore(store, tmp_path / "cache", max_bytes=1 << 20)
    digest = cached.put_bytes("k", b"payload")
    (tmp_path / "cache" / digest[:2] / digest).write_bytes(b"garbage")
    assert cached.get_bytes("k") == b"payload" and cached.misses == 1


def test_the_cache_stays_within_its_size(tmp_path):
    store = LocalStore(tmp_path / "store")
    cached = CachedStore(store, tmp_path / "cache", max_bytes=2500)
    for i in range(6):
        cached.put_bytes(f"k{i}", bytes([i]) * 1000)
    files = [p for p in (tmp_path / "cache").glob("*/*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 2500 and len(files) == 2
    assert cached.get_bytes("k0") == bytes([0]) * 1000  # evicted: read from the store
    assert cached.misses == 1
