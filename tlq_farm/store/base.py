"""The Store protocol: the commit protocol on top of a few raw primitives.

Commit protocol of one object `key` (the store is the truth of a job; a reader must never trust a
partial write):

    write:  withdraw the old marker -> write the object -> write the marker (its sha256 and size)
    read:   marker missing                  -> NotCommitted
            object's sha256/size != marker  -> delete object, checksum and marker -> CorruptObject

The marker is written last, so a marker implies a complete object. Withdrawing the old marker first
means a reader never pairs an old marker with new bytes. Subclasses provide the raw primitives (bytes in,
bytes out, no checks) and may serialize writers of one key with `_write_guard` / `_read_guard`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tlq_farm.store import keys

Payload = TypeVar("Payload")

# Streaming reads and hashes of files go in pieces of this size.
FILE_CHUNK = 1 << 20
# A reader that sees bytes not matching the marker re-reads this many times while the marker keeps
# changing (a concurrent rewrite on a store without locks) before it gives up.
READ_ATTEMPTS = 3


class StoreError(Exception):
    """Base class of every store error."""


class NotCommitted(StoreError):
    """The object has no commit marker: it was never written completely, or is being rewritten."""


class CorruptObject(StoreError):
    """The object does not match its commit marker; it has been deleted so that it is recomputed."""


class StoreUnavailable(StoreError):
    """The store cannot be reached or used (network, credentials, bucket, permissions, disk)."""


class StoreMissing(StoreUnavailable):
    """The store itself (its folder or bucket) does not exist; `what` says so without a remedy, for callers
    that know the right one ("bucket 'x' does not exist at URL")."""

    def __init__(self, message: str, what: str):
        super().__init__(message)
        self.what = what


@dataclass(frozen=True)
class Commit:
    """Content of a commit marker."""

    sha256: str
    size: int
    time: float


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read at call time (a caller may change it). /proc shows it without changing it;
    elsewhere os.umask must set it to read it, so the two calls are serialized."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as file:
        while chunk := file.read(FILE_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def marker_bytes(commit: Commit) -> bytes:
    return json.dumps(
        {"sha256": commit.sha256, "size": commit.size, "time": commit.time}, sort_keys=True
    ).encode()


def parse_marker(raw: bytes) -> Commit | None:
    """Commit from marker bytes, or None when they are not a valid marker (a damaged marker)."""
    try:
        fields = json.loads(raw)
        commit = Commit(sha256=str(fields["sha256"]), size=int(fields["size"]), time=float(fields["time"]))
    except (ValueError, TypeError, KeyError):
        return None
    if len(commit.sha256) != 64 or commit.size < 0:
        return None
    return commit


class Store(ABC):
    """An object store holding a job's state: committed objects, plus raw flags.

    Committed objects (put_bytes / put_file / get_bytes / get_file) follow the commit protocol above.
    Flags (put_flag / get_flag / exists_raw / delete_flag) are small raw objects with no protocol, for
    signals such as a job's cancel flag.
    """

    # Bytes of committed objects this process moved through this store (verified reads, committed writes):
    # a task's record carries its share (tlq_farm.steps.TaskMeter).
    bytes_read = 0
    bytes_written = 0
    # Held while adding to those: a worker's read-ahead thread (worker/cache.py) reads beside its task.
    _counting = threading.Lock()
    # Requests this process sent to a store across a network (S3); a folder store sends none.
    requests = 0

    # ------------------------------------------------------------------------------ raw primitives

    @property
    @abstractmethod
    def url(self) -> str:
        """Where the store is, in the form open_store() accepts."""

    @abstractmethod
    def _read_raw(self, raw_key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""

    @abstractmethod
    def _write_raw(self, raw_key: str, data: bytes) -> None:
        """Write (replace) the object; a concurrent reader sees the old or the new bytes, never a mix."""

    def _wrote(self, raw_key: str, digest: str) -> None:
        """Told the sha256 of an object just written (a folder store remembers it for its reads)."""

    @abstractmethod
    def _delete_raw(self, raw_key: str) -> None:
        """Delete the object; no error when it does not exist."""

    @abstractmethod
    def _exists_raw(self, raw_key: str) -> bool:
        """Whether the object exists."""

    @abstractmethod
    def _list_raw(self, prefix: str) -> Iterable[str]:
        """Every raw key starting with `prefix` (objects and their companions), any order."""

    @abstractmethod
    def _upload_file(self, raw_key: str, path: Path) -> tuple[str, int]:
        """Write the object from a file; return the (sha256, size) of the bytes written."""

    @abstractmethod
    def _download_file(self, raw_key: str, path: Path) -> bool:
        """Write the object into the file `path`; False when the object does not exist."""

    def _fetch_bytes(self, raw_key: str) -> tuple[bytes, str, int] | None:
        """(bytes, their sha256, size) of an object as stored, None when it does not exist (get_bytes checks
        them against the marker)."""
        data = self._read_raw(raw_key)
        return None if data is None else (data, sha256_hex(data), len(data))

    def _object_version(self, raw_key: str) -> str | None:
        """A token that changes whenever the object's bytes may have changed, or None when it does not exist.

        Lets a reader holding a verified copy check that the stored object is still that one without
        reading it. This default reads and hashes the object; stores override it with a metadata lookup."""
        data = self._read_raw(raw_key)
        return None if data is None else f"sha256:{sha256_hex(data)}:{len(data)}"

    def _count(self, read: int = 0, written: int = 0) -> None:
        with Store._counting:
            self.bytes_read += read
            self.bytes_written += written

    def prefetch(self, wanted: Iterable[str]) -> None:
        """A hint that the committed objects `wanted` are read next; a store with round trips to spare (the
        worker's cache over S3) looks their markers up side by side. Nothing to do here."""

    def read_ahead(self, wanted: Iterable[str]) -> Callable[[], None]:
        """A hint that the committed objects `wanted` are read by a later task -> wait(), which returns once
        whatever was started for them has ended. A store with a local cache (the worker's over S3) downloads
        them into it meanwhile. Nothing to do here."""
        return lambda: None

    def forget_prefetched(self) -> None:
        """Drop what prefetch() read and no read took (at the end of a task)."""

    def size_cache(self, job: str, nbytes: int) -> None:
        """A hint that the tasks of `job` read again `nbytes` of objects they read or wrote (plan.cache_bytes):
        a store with a local cache (the worker's over S3) grows it to hold them. Nothing to do here."""

    def _written_version(self, raw_key: str) -> str | None:
        """The _object_version token of the object this process has just written to `raw_key`, when the write
        itself told it (S3: the PUT's ETag), so that a reader keeping a copy needs no lookup; else None."""
        return None

    def _write_guard(self, key: str) -> contextlib.AbstractContextManager:
        """Held while the companions of `key` change; stores with locks serialize writers here."""
        return contextlib.nullcontext()

    def _read_guard(self, key: str) -> contextlib.AbstractContextManager:
        """Held while a marker and its object are read together."""
        return contextlib.nullcontext()

    def _after_delete_prefix(self, prefix: str) -> None:
        """Hook for cleanup after delete_prefix (a folder store removes empty folders)."""

    # ------------------------------------------------------------------------------ committed objects

    def put_bytes(self, key: str, data: bytes) -> str:
        """Write `data` under `key` with the commit protocol; return its sha256 hex."""
        keys.check_key(key)
        data = bytes(data)
        digest = sha256_hex(data)
        with self._write_guard(key):
            self._delete_raw(keys.marker_key(key))
            self._write_raw(key, data)
            self._wrote(key, digest)
            self._commit(key, digest, len(data))
        self._count(written=len(data))
        return digest

    def put_file(self, key: str, path: str | os.PathLike) -> str:
        """Write the file at `path` under `key` (streamed; multipart on S3); return its sha256 hex."""
        keys.check_key(key)
        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"cannot store {key!r}: {source} is not a file")
        with self._write_guard(key):
            self._delete_raw(keys.marker_key(key))
            digest, size = self._upload_file(key, source)
            self._wrote(key, digest)
            self._commit(key, digest, size)
        self._count(written=size)
        return digest

    def get_bytes(self, key: str, commit: Commit | None = None) -> bytes:
        """The committed bytes of `key`, verified against the marker's sha256 and size (`commit`: the marker
        as the caller just read it, which spares a second read of it)."""
        keys.check_key(key)
        data = self._read_verified(key, lambda: self._fetch_bytes(key), lambda data: None, commit)
        self._count(read=len(data))
        return data

    def get_file(self, key: str, path: str | os.PathLike, commit: Commit | None = None) -> Path:
        """Write the committed object `key` into the file `path` (verified, then renamed into place);
        `commit` as for get_bytes."""
        return self._get_file_verified(key, path, commit)[0]

    def _get_file_verified(self, key: str, path: str | os.PathLike, commit: Commit | None = None
                           ) -> tuple[Path, str, int]:
        """get_file -> (the file, the sha256 and size its bytes were verified to): a caller keeping a copy
        by digest (the worker's cache) need not hash the file again."""
        keys.check_key(key)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)

        def fetch() -> tuple[tuple[Path, str, int], str, int] | None:
            handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
            os.close(handle)
            partial = Path(name)
            try:
                # mkstemp creates 0600; the file is the caller's, with the usual mode (an export must be
                # readable by the account that serves it when the umask allows).
                os.chmod(partial, 0o666 & ~current_umask())
                if not self._download_file(key, partial):
                    partial.unlink(missing_ok=True)
                    return None
                digest, size = sha256_file(partial)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            return (partial, digest, size), digest, size

        partial, digest, size = self._read_verified(key, fetch, lambda rejected: rejected[0].unlink(missing_ok=True),
                                                    commit)
        self._count(read=size)
        os.replace(partial, target)
        return target, digest, size

    def is_committed(self, key: str) -> bool:
        """Whether `key` has a commit marker (the object is then complete, unless damaged later)."""
        return self._exists_raw(keys.marker_key(keys.check_key(key)))

    def commit_info(self, key: str) -> Commit | None:
        """The marker of `key` (sha256, size, time), or None when not committed or unreadable."""
        raw = self._read_raw(keys.marker_key(keys.check_key(key)))
        return None if raw is None else parse_marker(raw)

    def list_committed(self, prefix: str = "") -> list[str]:
        """Sorted keys under `prefix` that have a commit marker."""
        keys.check_prefix(prefix)
        suffix = keys.COMMIT_SUFFIX
        return sorted(raw[: -len(suffix)] for raw in self._list_raw(prefix) if raw.endswith(suffix))

    def delete(self, key: str) -> None:
        """Delete a committed object: marker first, so that nobody trusts it while it goes."""
        keys.check_key(key)
        with self._write_guard(key):
            self._delete_companions_and_object(key)

    def delete_prefix(self, prefix: str) -> None:
        """Delete everything under `prefix` (objects, companions, flags); markers go first."""
        keys.check_prefix(prefix)
        raw_keys = sorted(self._list_raw(prefix))
        markers = [raw for raw in raw_keys if raw.endswith(keys.COMMIT_SUFFIX)]
        others = [raw for raw in raw_keys if not raw.endswith(keys.COMMIT_SUFFIX)]
        self._delete_many(markers)
        self._delete_many(others)
        self._after_delete_prefix(prefix)

    def _delete_many(self, raw_keys: list[str]) -> None:
        """Delete several raw keys; stores with batch deletes override this."""
        for raw in raw_keys:
            self._delete_raw(raw)

    # ------------------------------------------------------------------------------ flags

    def list_raw(self, prefix: str = "") -> list[str]:
        """Sorted raw keys under `prefix`, committed or not (objects, companions, flags): what a cleanup
        has to remove, including the pieces of a write that never committed."""
        keys.check_prefix(prefix)
        return sorted(self._list_raw(prefix))

    def exists_raw(self, key: str) -> bool:
        """Whether an object exists under `key`, committed or not (flags such as cancel)."""
        return self._exists_raw(keys.check_key(key))

    def put_flag(self, key: str, value: Any = b"") -> None:
        """Write a small raw object: bytes as they are, anything else as JSON (sorted keys)."""
        keys.check_key(key)
        if isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
        else:
            data = json.dumps(value, sort_keys=True).encode()
        self._write_raw(key, data)

    def get_flag(self, key: str) -> bytes | None:
        """The bytes of a raw object, or None when it does not exist."""
        return self._read_raw(keys.check_key(key))

    def get_flag_json(self, key: str, default: Any = None) -> Any:
        """A raw object written with put_flag(key, json_value), decoded; `default` when absent."""
        data = self.get_flag(key)
        if data is None:
            return default
        try:
            return json.loads(data)
        except ValueError:
            raise StoreError(f"flag {key!r} in {self.url} is not JSON; read it with get_flag()") from None

    def delete_flag(self, key: str) -> None:
        self._delete_raw(keys.check_key(key))

    # ------------------------------------------------------------------------------ protocol internals

    def _commit(self, key: str, digest: str, size: int) -> None:
        # The marker holds the checksum: one write per commit (no separate checksum file, which no reader
        # needs, and which cost a write, or on S3 a request, per object).
        self._write_raw(keys.marker_key(key), marker_bytes(Commit(digest, size, time.time())))

    def _delete_companions_and_object(self, key: str) -> None:
        self._delete_raw(keys.marker_key(key))
        self._delete_raw(keys.checksum_key(key))
        self._delete_raw(key)

    def _read_marker(self, key: str) -> tuple[bool, Commit | None]:
        """(marker exists, its commit or None when it is damaged)."""
        raw = self._read_raw(keys.marker_key(key))
        return (False, None) if raw is None else (True, parse_marker(raw))

    def _read_verified(
        self,
        key: str,
        fetch: Callable[[], tuple[Payload, str, int] | None],
        reject: Callable[[Payload], None],
        known: Commit | None = None,
    ) -> Payload:
        """Read marker and object, check one against the other; handle a concurrent rewrite.

        fetch() reads the object -> (payload, sha256, size), or None when the object is missing.
        reject(payload) disposes of a payload that failed the check. known: the marker as the caller read it
        just before (the first attempt trusts it; a mismatch reads the marker again, as a rewrite would).
        """
        for attempt in range(READ_ATTEMPTS):
            with self._read_guard(key):
                present, commit = (True, known) if attempt == 0 and known is not None else self._read_marker(key)
                if not present:
                    raise NotCommitted(
                        f"{key!r} in {self.url} is not committed (no commit marker): it was never completely "
                        "written or is being rewritten; compute it, or wait for the task that writes it"
                    )
                fetched = fetch() if commit is not None else None
            if fetched is not None:
                payload, digest, size = fetched
                if commit is not None and digest == commit.sha256 and size == commit.size:
                    return payload
                reject(payload)
            # A mismatch while the marker changed under us is a rewrite in flight, not damage: read again.
            present_now, commit_now = self._read_marker(key)
            if not present_now:
                raise NotCommitted(f"{key!r} in {self.url} was withdrawn while being read (a rewrite is in progress)")
            if commit is None or commit_now != commit:
                if commit_now is not None:
                    continue
            problem = self._describe_mismatch(commit, fetched)
            if self._discard_if_unchanged(key, commit):
                outcome = "its object and commit marker were deleted so that the task producing it runs again"
            else:
                outcome = "a newer write replaced it meanwhile; read it again"
            raise CorruptObject(f"{key!r} in {self.url} is corrupt ({problem}); {outcome}")
        raise CorruptObject(
            f"{key!r} in {self.url} changed during each of {READ_ATTEMPTS} reads (concurrent writers of "
            "different bytes); nothing was deleted; read it again once the writers are done"
        )

    @staticmethod
    def _describe_mismatch(commit: Commit | None, fetched: tuple[Any, str, int] | None) -> str:
        if commit is None:
            return "its commit marker is damaged"
        if fetched is None:
            return "the commit marker exists but the object is missing"
        _, digest, size = fetched
        return f"sha256 {digest[:12]}... size {size}, marker says sha256 {commit.sha256[:12]}... size {commit.size}"

    def _discard_if_unchanged(self, key: str, commit: Commit | None) -> bool:
        """Delete object and companions unless a newer write has committed meanwhile; True if deleted."""
        with self._write_guard(key):
            present, current = self._read_marker(key)
            if present and current != commit:
                return False
            self._delete_companions_and_object(key)
        return True

