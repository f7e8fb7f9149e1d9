"""A size-bounded local cache of store objects, by content: what a worker wrote or read is not downloaded again.

Entries are named by sha256, so a cached copy serves any key whose commit marker names that digest; the
marker is still read on every get (a rewrite or a corrupt-and-deleted object is seen at once). The
oldest-used files go first when the cache exceeds its size, so a cache smaller than what a block's tasks
read again (plan.cache_bytes: 5.8 GB at Qwen2-VL-7B) evicts each object just before its next read; given no
size, it grows to each job's figure as far as its disk has room (size_cache). A cache file is hashed when
this process first serves it and again only once it changed (inode, size or mtime), as the folder store does.

A hit on an object that staging wrote (the checkpoint's pieces, the calibration samples, the manifest) also
checks that the store's object is still the one that was verified, so that damage in the store does not hide
behind the cache: no task could compute such an object again. Beside each such entry lies, per store key,
the object's version token (Store._object_version: the S3 ETag and size, a file's size, mtime and inode)
taken when this cache wrote or downloaded it (for a write on S3, the ETag that the PUT answered with: no
lookup). A hit compares it with a fresh lookup (one HEAD request on S3). When the token differs or is
unknown, the object is read through the store's verifying path: a sound object is served and its token
kept; a corrupt one is deleted by the store, and is committed again from the cached copy, which hashes to
the marker's digest and so is the committed content itself. The job goes on with the same bytes.

A hit on a task's output needs only its marker: the cached bytes hash to the digest the marker names, so
they are the committed content whatever the store's copy has become. A damaged copy in the store is found by
whoever reads it from there (the read deletes it and the task that wrote it runs again), not by this cache.
On S3 a hit is then one request instead of two: the tasks of a block read what they and the tasks before
them wrote, again and again, and those HEADs were a third of a worker's requests. With `known` (the farm's
notes of what its workers committed, dispatch.KnownCommits) a read of a task's output takes the note for its
marker: a hit sends no request, a miss only the download.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tlq_farm.spec import format_size
from tlq_farm.store import CorruptObject, Store, keys
from tlq_farm.store.base import Commit

log = logging.getLogger(__name__)
AHEAD = ".ahead"  # the folder's subfolder of read-aheads under way: files named by their process's pid
RESCAN_S = 30.0  # the longest a process trusts its own count of the cache's size between two scans


def cache_dir(env) -> Path:
    """A worker's cache folder: under TLQ_CACHE_DIR, else under the user's cache folder (XDG_CACHE_HOME or
    ~/.cache: on a disk, where the system's temporary folder may be memory, and a 7B job's cache holds GBs),
    one per GPU ('cuda0', 'cuda1', ...; 'cpu' for the rest). Each process sizes its cache for its own tasks
    (size_cache), so the processes of a machine with several GPUs, which run different blocks and shards,
    each need their own; one folder would hold a single process's working set for all of them."""
    base = Path(env["TLQ_CACHE_DIR"]) if env.get("TLQ_CACHE_DIR") else (
        Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tlq-farm")
    if env.get("TLQ_DEVICE") != "cuda":
        return base / "cpu"
    return base / ("cuda" + env.get("CUDA_VISIBLE_DEVICES", "").strip().replace(",", "-"))


class CachedStore:
    """`store` with get_bytes served from a local folder when the committed digest is cached there.

    Every other attribute is the wrapped store's; put_bytes writes through and keeps a copy; get_file is
    served from the cache like get_bytes (without the repair of a corrupt store object).
    hits: reads served from the cache (hit_bytes: their bytes); misses: reads that downloaded the object;
    repairs: corrupt store objects committed again from the cache. grow: max_bytes is a floor (size_cache).
    """

    def __init__(self, store: Store, folder: str | os.PathLike, max_bytes: int, grow: bool = False, known=None):
        self._store = store
        # known: where the farm's workers note the commits of task outputs (dispatch.KnownCommits, in Redis), so
        # that a hit on an output needs no marker read; None: every read reads its marker.
        self.known = known
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        # grow: max_bytes is a floor, raised to each job's working set as far as the disk allows (size_cache).
        self.grow = grow
        self._sized: dict[str, int] = {}  # job -> the working set size_cache() was last given for it
        self.hits = 0
        self.hit_bytes = 0
        self.misses = 0
        self.repairs = 0
        # cache file -> (its identity: inode, size, mtime, when it last hashed to its name): a hit on an
        # unchanged file is not hashed again (a block's tasks read the same activations several times).
        self._verified: dict[Path, tuple] = {}
        # key -> (its marker, its object's version) as prefetch() read them, for the one read that follows.
        self._ahead: dict[str, tuple[Commit, str | None]] = {}
        # The cache's size as last scanned plus what this process added since, and when it was scanned: the
        # folder is walked (a stat per entry) only when that passes the limit or the scan is old (other
        # processes may share the folder), not after every write.
        self._estimate: int | None = None
        self._scanned = 0.0
        self._lock = threading.Lock()
        self._read_ahead_keys: set[str] = set()
        self._ahead_pool = None  # one thread, started by the first read_ahead()
        self._drop_dead_downloads()

    def __getattr__(self, name):
        return getattr(self._store, name)

    def _path(self, digest: str) -> Path:
        return self.folder / digest[:2] / digest

    def _version_path(self, digest: str, key: str) -> Path:
        # Per (store, key): one cached content may stand for several keys, each with its own object.
        name = hashlib.sha256(f"{self._store.url}\n{key}".encode()).hexdigest()[:32]
        return self.folder / digest[:2] / f"{digest}.keys" / name

    def _version(self, key: str) -> str | None:
        return self._store._object_version(keys.check_key(key))

    @staticmethod
    def _checked(key: str) -> bool:
        """Whether a hit on `key` checks the store's object version (staged inputs; module docstring)."""
        return not keys.is_task_output(key)

    def _vouched(self, digest: str, key: str, token: str | None) -> bool:
        """Whether the store's object `key`, of version `token`, is the one this cache saw hold `digest`."""
        return token is not None and token == self._recorded(digest, key)

    def _remember(self, digest: str, key: str, version: str | None) -> None:
        """Record the version of the store's object `key` whose content is the cached `digest`."""
        if version is None or not self._path(digest).exists():
            return
        path = self._version_path(digest, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(version)
        os.replace(tmp, path)

    def _recorded(self, digest: str, key: str) -> str | None:
        try:
            return self._version_path(digest, key).read_text()
        except OSError:
            return None

    def _keep(self, digest: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        path = self._path(digest)
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{digest}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self._evict(len(data))

    def _evict(self, added: int) -> None:
        """Bring the cache within its size after `added` bytes were put in it."""
        if self._estimate is not None and time.monotonic() - self._scanned < RESCAN_S:
            self._estimate += added
            if self._estimate <= self.max_bytes:
                return
        entries = self._entries()
        total = sum(st.st_size for _, st in entries)
        for p, st in sorted(entries, key=lambda entry: entry[1].st_atime):
            if total <= self.max_bytes:
                break
            total -= st.st_size
            p.unlink(missing_ok=True)
            shutil.rmtree(p.with_name(f"{p.name}.keys"), ignore_errors=True)
        self._estimate, self._scanned = total, time.monotonic()

    def _entries(self) -> list[tuple[Path, os.stat_result]]:
        """The cached files and their stat results (one stat each; what another process on the folder evicts
        meanwhile is left out)."""
        found = []
        for path in self.folder.glob("*/*"):
            try:
                st = path.stat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and not path.name.startswith("."):
                found.append((path, st))
        return found

    def size_cache(self, job: str, nbytes: int) -> None:
        """Hold `nbytes`, the working set of `job`'s blocks (plan.cache_bytes; larger once the job's groups are
        known): with `grow`, the cache's size is raised to it, as far as its disk has room (room()). A cache
        left smaller logs it, once per job and figure: its tasks will download again what they read a moment
        before."""
        if nbytes <= self._sized.get(job, -1):
            return
        self._sized[job] = nbytes
        if self.grow:
            self.max_bytes = max(self.max_bytes, min(nbytes, self.room()))
        if nbytes > self.max_bytes:
            fix = (f"free {format_size(2 * (nbytes - self.max_bytes))} on that disk (the cache takes half of what "
                   "is free) or point TLQ_CACHE_DIR to a disk with more room"
                   if self.grow else "leave TLQ_CACHE_BYTES unset (the cache then grows to what a job needs, "
                   f"as far as its disk allows) or set it to {format_size(nbytes)} or more")
            log.warning("job %s: a block's tasks read again %s of objects, more than this worker's cache of %s in "
                        "%s holds: they will download some of them again; %s", job, format_size(nbytes),
                        format_size(self.max_bytes), self.folder, fix)

    def room(self) -> int:
        """The most this cache may grow to: what it holds now and half its disk's free space (the rest is left
        to everything else on that disk)."""
        return sum(st.st_size for _, st in self._entries()) + shutil.disk_usage(self.folder).free // 2

    def put_file(self, key: str, path) -> str:
        self._ahead.pop(key, None)  # a marker read ahead of this write is no longer the key's
        digest = self._store.put_file(key, path)
        self._note(key, digest, Path(path).stat().st_size)
        return digest

    def delete(self, key: str) -> None:
        self._ahead.pop(key, None)
        if self.known is not None and keys.is_task_output(key):
            self.known.drop(key)
        self._store.delete(key)

    def _note(self, key: str, digest: str, size: int) -> None:
        if self.known is not None and keys.is_task_output(key):
            self.known.add(key, digest, size)

    def put_bytes(self, key: str, data: bytes) -> str:
        self._ahead.pop(key, None)
        digest = self._store.put_bytes(key, data)
        self._note(key, digest, len(data))
        self._keep(digest, bytes(data))
        # The token of what this write stored (S3: the PUT's ETag), else looked up after the write: a
        # concurrent rewrite since leaves a token that no longer matches, which costs one verifying read
        # later, never a false hit. Taken for every write, so that the store keeps none nobody takes.
        written = self._store._written_version(keys.check_key(key))
        if self._checked(key) and self._path(digest).exists():
            self._remember(digest, key, written or self._version(key))
        return digest

    def prefetch(self, wanted) -> None:
        """Read the markers and object versions of the committed objects `wanted`, side by side (up to 8
        requests at once), for the reads that follow in this task: on S3 about one round trip for all of
        them, where each read would take two in turn. Each read takes its own (a second read of the key looks
        again); forget_prefetched() drops what no read took. A marker read ahead is as safe as one read just
        before: a read that finds other bytes reads the marker again (Store._read_verified), and the version
        is taken before the object is read, as _fetch takes it."""
        from concurrent.futures import ThreadPoolExecutor

        from tlq_farm.store import StoreError

        todo = [k for k in dict.fromkeys(wanted) if k not in self._ahead]
        for key, commit in self._known([k for k in todo if not self._checked(k)]).items():
            self._ahead[key] = (commit, None)
        todo = [k for k in todo if k not in self._ahead]

        def look(key: str):
            try:
                info = self._store.commit_info(key)
                return None if info is None else (info, self._version(key) if self._checked(key) else None)
            except StoreError:  # the read itself will meet it and say what is wrong
                return None

        if todo:
            with ThreadPoolExecutor(max_workers=min(8, len(todo))) as pool:
                for key, ahead in zip(todo, pool.map(look, todo)):
                    if ahead is not None:
                        self._ahead[key] = ahead

    def forget_prefetched(self) -> None:
        self._ahead.clear()

    def commit_info(self, key: str) -> Commit | None:
        ahead = self._ahead.get(key)
        return ahead[0] if ahead is not None else self._store.commit_info(key)

    def _take_ahead(self, key: str, commit: Commit | None) -> tuple[Commit | None, Callable[[], str | None]]:
        """(marker, version()) for a read of `key`: prefetch's, unless the caller holds a marker of its own;
        version() gives the object's version as prefetch read it, else looks it up."""
        ahead = self._ahead.pop(key, None)
        if ahead is not None and (commit is None or commit is ahead[0]):
            return ahead[0], lambda: ahead[1]
        if commit is None and not self._checked(key):
            commit = self._known([key]).get(key)
        return commit or self._store.commit_info(key), lambda: self._version(key)

    def _known(self, wanted: list[str]) -> dict[str, Commit]:
        """What the farm noted of the commits of the task outputs `wanted` (none without `known`). A note is
        the marker as its writer wrote it: a read that finds other bytes (the output written again since)
        reads the marker again (Store._read_verified), and a hit serves bytes that hash to a digest once
        committed under the key, as a marker-only hit does (module docstring)."""
        return self.known.get(wanted) if self.known is not None and wanted else {}

    def get_bytes(self, key: str, commit: Commit | None = None) -> bytes:
        info, version = self._take_ahead(key, commit)
        if info is None:
            return self._store.get_bytes(key)  # raises NotCommitted / CorruptObject with the store's message
        path = self._path(info.sha256)
        data = self._read_cached(path, info.sha256)
        if data is not None:
            if not self._checked(key) or self._vouched(info.sha256, key, version()):
                self.hits += 1
                self.hit_bytes += len(data)
                self._touch(path)
                return data
            return self._confirm(key, data, info.sha256)
        return self._fetch(key, info, version)

    @staticmethod
    def _touch(path: Path) -> None:
        # Marks the entry as used for eviction (access time) and leaves its mtime, part of its identity.
        try:
            os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))
        except OSError:
            pass

    @staticmethod
    def _identity(st: os.stat_result) -> tuple:
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    def _read_cached(self, path: Path, digest: str) -> bytes | None:
        """The cached bytes named `digest`, None when absent or damaged (a damaged file is deleted)."""
        try:
            with open(path, "rb") as f:
                identity = self._identity(os.fstat(f.fileno()))
                data = f.read()
        except OSError:  # not cached, or evicted by another process meanwhile
            return None
        if self._verified.get(path) == identity and len(data) == identity[2]:
            return data
        if hashlib.sha256(data).hexdigest() != digest:
            path.unlink(missing_ok=True)  # a damaged cache file: fetch the object again
            self._verified.pop(path, None)
            return None
        self._verified[path] = identity
        return data

    def _file_verified(self, path: Path, digest: str, size: int) -> bool:
        """Whether the cache file `path` holds the bytes of `digest` (hashed again only when it changed)."""
        from tlq_farm.store.base import sha256_file

        try:
            identity = self._identity(path.stat())
        except OSError:
            return False
        if self._verified.get(path) == identity:
            return identity[2] == size
        if sha256_file(path) != (digest, size):
            return False
        self._verified[path] = identity
        return True

    def get_file(self, key: str, path: str | os.PathLike, commit: Commit | None = None) -> Path:
        """The committed object `key` as the file `path` (large staged pieces are read this way): copied
        from the cache on a hit, as get_bytes serves one; otherwise downloaded, and a copy kept."""
        target = Path(path)
        info, version = self._take_ahead(key, commit)
        # Taken before the object is read: it vouches for a hit, and for a miss it is what _remember keeps.
        checked = self._checked(key)
        token = version() if checked else None
        if info is not None:
            cached = self._path(info.sha256)
            current = not checked or self._vouched(info.sha256, key, token)
            if current and self._file_verified(cached, info.sha256, info.size):
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
                shutil.copyfile(cached, tmp)
                os.replace(tmp, target)
                self._touch(cached)
                self.hits += 1
                self.hit_bytes += info.size
                return target
        self._missed()
        out, digest, size = self._store._get_file_verified(key, target, commit=info)
        self._keep_file(out, digest, size, key, token)
        return out

    def _keep_file(self, path: Path, digest: str, size: int, key: str, token: str | None, move: bool = False) -> None:
        """Keep a copy of the downloaded file of `key`, verified to `digest` and `size` (moved into the cache with
        `move`), and for a staged key the object's version `token` taken before the download (None otherwise)."""
        cached = self._path(digest)
        if size <= self.max_bytes and not cached.exists():
            cached.parent.mkdir(parents=True, exist_ok=True)
            if move:
                os.replace(path, cached)
                # The very file just hashed: its first hit need not hash it again.
                self._verified[cached] = self._identity(cached.stat())
            else:
                tmp = cached.with_name(f".{digest}.{os.getpid()}.{threading.get_ident()}.tmp")
                shutil.copyfile(path, tmp)
                os.replace(tmp, cached)
            self._evict(size)
        self._remember(digest, key, token)  # nothing for a task's output, whose token is None
        if move:
            path.unlink(missing_ok=True)

    def _missed(self) -> None:
        with self._lock:  # the read-ahead thread counts its downloads too
            self.misses += 1

    def read_ahead(self, wanted) -> Callable[[], None]:
        """Download the committed objects `wanted` into the cache in a background thread, while the task that
        asked computes -> wait(). Each key once per process; what the cache holds already, or what is not
        committed yet, is left alone, and so is an object of more than a quarter of the cache. Meant for the
        next block's staged weights (plan.read_ahead): at 7B, 0.47 GB a block (within a quarter of the 5.8 GB
        the cache grows to, size_cache), 4 s on 1 GbE that the next block's first task would otherwise wait
        for. Errors are left to the read that follows, which meets them again and says what is wrong."""
        from concurrent.futures import ThreadPoolExecutor

        todo = [k for k in dict.fromkeys(wanted) if k not in self._read_ahead_keys]
        if not todo:
            return lambda: None
        self._read_ahead_keys.update(todo)
        if self._ahead_pool is None:
            self._ahead_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tlq-read-ahead")
        future = self._ahead_pool.submit(self._download_ahead, todo)

        def wait() -> None:
            future.exception()  # waits; _download_ahead logs its own errors and raises none

        return wait

    def _drop_dead_downloads(self) -> None:
        """Remove what read-aheads of processes that no longer run left half-way (a killed worker's); the
        folder may be shared by several live workers, whose downloads are theirs."""
        for part in (self.folder / AHEAD).glob("*"):
            try:
                os.kill(int(part.name.lstrip(".").split(".")[0]), 0)
            except ProcessLookupError:
                part.unlink(missing_ok=True)
            except (ValueError, OSError):
                pass

    def _download_ahead(self, wanted: list[str]) -> None:
        for key in wanted:
            try:
                info = self._store.commit_info(key)
                if info is None:  # not yet: a later task may ask again
                    self._read_ahead_keys.discard(key)
                    continue
                # Larger, it would push out what the running block's tasks still read (their activations
                # and weights), which LRU eviction cannot tell from what is dead.
                if info.size > self.max_bytes // 4 or self._path(info.sha256).exists():
                    continue
                token = self._version(key) if self._checked(key) else None
                part = self.folder / AHEAD / f".{os.getpid()}.part"  # hidden: no cache entry (_evict)
                self._missed()
                self._keep_file(*self._store._get_file_verified(key, part, commit=info), key, token, move=True)
            except Exception as error:  # noqa: BLE001 - the task that reads it will meet it again, and report
                self._read_ahead_keys.discard(key)
                log.info("read-ahead of %s failed: %s", key, error)

    def _fetch(self, key: str, commit: Commit | None = None, version: Callable[[], str | None] | None = None) -> bytes:
        # The token is taken before the read: if the object changes in between, it is stale and the next
        # hit reads again, whereas a token taken after could vouch for bytes that were never checked.
        checked = self._checked(key)
        token = None
        if checked:
            token = version() if version is not None else self._version(key)
        self._missed()
        data = self._store.get_bytes(key, commit=commit)
        digest = hashlib.sha256(data).hexdigest()
        self._keep(digest, data)
        if checked:
            self._remember(digest, key, token)
        return data

    def _confirm(self, key: str, cached: bytes, digest: str) -> bytes:
        """The store's object behind a cached copy changed or was never seen: check it, repair it if corrupt."""
        try:
            return self._fetch(key)
        except CorruptObject as error:
            if self._store.commit_info(key) is not None:
                return self._fetch(key)  # a newer write committed meanwhile: read that one
            # The marker read just before named `digest`, and a task writes the same bytes whenever it runs,
            # so the cached copy is exactly what the deleted object should have held.
            log.warning("%s; committing it again from the verified local copy %s", error, digest[:12])
            self._store.put_bytes(key, cached)
            self._remember(digest, key, self._version(key))
            self.repairs += 1
            return cached
