"""LocalStore: a folder as an object store.

Each write goes to a temporary file in the target's own folder, is fsynced and then renamed over the
target with os.replace, so a reader sees the old file or the new one, never a torn one. Writers of the
same key (several processes, possibly on several machines sharing the folder) are serialized by an
advisory lock on the key's stripe (one of LOCK_STRIPES lock files, chosen by a hash of the key), so the
object, its checksum and its marker always come from the same write: the last complete write wins.
Readers take the same lock shared while they read a marker and its object. Keys that share a stripe only
wait for each other a little more; no code path holds two store locks at once, so sharing cannot deadlock.

Temporary files and the lock folder start with a dot; keys never do, so listings never show them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from tlq_farm.store import keys
from tlq_farm.store.base import FILE_CHUNK, Store, StoreMissing, StoreUnavailable, sha256_hex

try:
    import fcntl
except ImportError:  # not POSIX: rename stays atomic, only same-key writers are no longer serialized
    fcntl = None

LOCK_FOLDER = ".locks"
# The lock folder holds at most this many files, whatever the number of keys.
LOCK_STRIPES = 256


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


_MADE_FOLDERS: set[Path] = set()


def _open_temporary(target: Path) -> tuple[int, Path]:
    """Create a fresh hidden file next to `target`, with the usual permissions (umask applies)."""
    if target.parent not in _MADE_FOLDERS:
        target.parent.mkdir(parents=True, exist_ok=True)
        _MADE_FOLDERS.add(target.parent)
    while True:
        candidate = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), candidate
        except FileExistsError:
            continue
        except FileNotFoundError:  # the folder went away (a deleted job) since it was made: make it again
            _MADE_FOLDERS.discard(target.parent)
            target.parent.mkdir(parents=True, exist_ok=True)


def atomic_write_bytes(target: Path, data: bytes, sync_folder: bool = True) -> None:
    """Write `data` to `target` through a fsynced temporary file and an atomic rename (made durable with the
    folder's fsync, or by a later write into the same folder that fsyncs it: sync_folder=False)."""
    handle, temporary = _open_temporary(target)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if sync_folder:
        _fsync_folder(target.parent)


def atomic_copy_file(source: Path, target: Path) -> tuple[str, int]:
    """Copy `source` to `target` atomically; return (sha256, size) of the bytes copied. The rename is made
    durable by the commit marker's write into the same folder."""
    digest = hashlib.sha256()
    size = 0
    handle, temporary = _open_temporary(target)
    try:
        with os.fdopen(handle, "wb") as out, open(source, "rb") as src:
            while chunk := src.read(FILE_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return digest.hexdigest(), size


@contextlib.contextmanager
def _local_errors(root: Path, action: str) -> Iterator[None]:
    """Turn OS errors other than 'not found' into StoreUnavailable with a hint."""
    try:
        yield
    except StoreUnavailable:
        raise
    except OSError as error:
        if error.errno == errno.ENOSPC:
            hint = "the disk is full: free space or point TLQ_STORE_URL elsewhere"
        elif isinstance(error, PermissionError):
            hint = "check the folder's permissions (the store needs to read and write it)"
        else:
            hint = "check that the folder exists and is writable"
        raise StoreUnavailable(f"local store {root}: cannot {action}: {error}; {hint}") from error


class LocalStore(Store):
    """An object store in the folder `root`; keys are paths below it.

    create=True makes a missing folder; create=False raises StoreMissing instead (nothing is created).
    """

    def __init__(self, root: str | os.PathLike, *, create: bool = True):
        self.root = Path(root).expanduser().resolve()
        self._locks = threading.local()
        self._digests: dict[str, tuple[tuple, str]] = {}  # raw key -> (file identity, sha256 of its bytes)
        if not create:
            if self.root.is_dir():
                return
            if self.root.exists():
                raise StoreUnavailable(f"store folder {self.root} is a file, not a folder: point the store elsewhere")
            raise StoreMissing(f"store folder {self.root} does not exist: check the path, or create the store",
                               what=f"store folder {self.root} does not exist")
        with _local_errors(self.root, "create the store folder"):
            self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    @property
    def url(self) -> str:
        return str(self.root)

    def path(self, key: str) -> Path:
        """The file holding object `key` (for tools that want to read it in place)."""
        return self.root / keys.check_key(key)

    def _file(self, raw_key: str) -> Path:
        return self.root / raw_key

    # ---------------------------------------------------------------------------------- primitives

    def _read_raw(self, raw_key: str) -> bytes | None:
        found = self._read_identified(raw_key)
        return None if found is None else found[0]

    def _read_identified(self, raw_key: str) -> tuple[bytes, tuple] | None:
        """(the file's bytes, the identity of the file they were read from: device, inode, size, mtime)."""
        with _local_errors(self.root, f"read {raw_key!r}"):
            try:
                handle = os.open(self._file(raw_key), os.O_RDONLY)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return None
            try:
                st = os.fstat(handle)
                with os.fdopen(handle, "rb", closefd=False) as f:
                    data = f.read()
            finally:
                os.close(handle)
        return data, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _fetch_bytes(self, raw_key: str) -> tuple[bytes, str, int] | None:
        # The sha256 of a file this process hashed before, unchanged since (same inode, size and mtime: every
        # write renames a new file into place), is not computed again: the stats, solve and propagate tasks
        # of a block read the same block and shards, and hashing them was 5 % of a job's CPU.
        found = self._read_identified(raw_key)
        if found is None:
            return None
        data, version = found
        known = self._digests.get(raw_key)
        digest = known[1] if known is not None and known[0] == version and len(data) == version[2] else sha256_hex(data)
        self._digests[raw_key] = (version, digest)
        return data, digest, len(data)

    def _wrote(self, raw_key: str, digest: str) -> None:
        # A task reads what the task before it wrote in this process (the shards a propagate wrote, the
        # partial a stats task wrote): the digest computed for the write serves those reads too.
        with contextlib.suppress(OSError):
            st = os.stat(self._file(raw_key))
            self._digests[raw_key] = ((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), digest)

    def _write_raw(self, raw_key: str, data: bytes) -> None:
        # An object's rename is made durable by its commit marker's, written next into the same folder: one
        # folder fsync per commit. (Should a crash lose the object's rename but keep the marker, the read
        # finds them apart and the object is recomputed.)
        with _local_errors(self.root, f"write {raw_key!r}"):
            atomic_write_bytes(self._file(raw_key), data, sync_folder=raw_key.endswith(keys.COMMIT_SUFFIX))

    def _delete_raw(self, raw_key: str) -> None:
        with _local_errors(self.root, f"delete {raw_key!r}"):
            try:
                self._file(raw_key).unlink()
            except (FileNotFoundError, NotADirectoryError):
                pass

    def _exists_raw(self, raw_key: str) -> bool:
        return self._file(raw_key).is_file()

    def _object_version(self, raw_key: str) -> str | None:
        # Every write renames a new file into place (new inode); an edit in place moves the mtime.
        with _local_errors(self.root, f"look up {raw_key!r}"):
            try:
                st = self._file(raw_key).stat()
            except (FileNotFoundError, NotADirectoryError):
                return None
        return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"

    def _list_raw(self, prefix: str) -> list[str]:
        # Walk only the deepest folder the prefix names; its last part may be a partial file name.
        folder_part = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root / folder_part if folder_part else self.root
        if not start.is_dir():
            return []
        found = []
        with _local_errors(self.root, f"list {prefix!r}"):
            for folder, subfolders, files in os.walk(start):
                subfolders[:] = [name for name in subfolders if not name.startswith(".")]
                relative = Path(folder).relative_to(self.root).as_posix()
                base = "" if relative == "." else relative + "/"
                found.extend(
                    base + name for name in files if not name.startswith(".") and (base + name).startswith(prefix)
                )
        return found

    def _upload_file(self, raw_key: str, path: Path) -> tuple[str, int]:
        with _local_errors(self.root, f"write {raw_key!r} from {path}"):
            return atomic_copy_file(path, self._file(raw_key))

    def _download_file(self, raw_key: str, path: Path) -> bool:
        with _local_errors(self.root, f"copy {raw_key!r} to {path}"):
            try:
                shutil.copyfile(self._file(raw_key), path)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                if not self._file(raw_key).is_file():
                    return False
                raise
        return True

    def _after_delete_prefix(self, prefix: str) -> None:
        """Remove folders left empty under the prefix (bottom up); the root itself stays."""
        folder_part = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root / folder_part if folder_part else self.root
        if not start.is_dir():
            return
        for folder, subfolders, _ in os.walk(start, topdown=False):
            here = Path(folder)
            if here == self.root or here.name.startswith(".") or LOCK_FOLDER in here.relative_to(self.root).parts:
                continue
            with contextlib.suppress(OSError):
                here.rmdir()  # fails (and is skipped) when not empty

    # ---------------------------------------------------------------------------------- locks

    @contextlib.contextmanager
    def _lock(self, key: str, exclusive: bool) -> Iterator[None]:
        if fcntl is None:
            yield
            return
        # One lock file per stripe, the stripe chosen by a hash of the key, so the folder stays bounded
        # however many keys a store holds. Lock files are never deleted: deleting a lock file another
        # process holds would split the lock in two.
        stripe = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % LOCK_STRIPES
        handle = self._lock_handle(stripe, key)
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

    def _lock_handle(self, stripe: int, key: str) -> int:
        """This thread's open descriptor of a stripe's lock file (opened once: an open per write cost as much
        as the write). Per thread, since flock locks belong to an open file, which threads would share."""
        handles = self._locks.__dict__.setdefault("handles", {})
        if stripe not in handles:
            lock_path = self.root / LOCK_FOLDER / f"stripe-{stripe:03d}.lock"
            with _local_errors(self.root, f"lock {key!r}"):
                lock_path.parent.mkdir(exist_ok=True)
                handles[stripe] = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        return handles[stripe]

    def _write_guard(self, key: str) -> contextlib.AbstractContextManager:
        return self._lock(key, exclusive=True)

    def _read_guard(self, key: str) -> contextlib.AbstractContextManager:
        return self._lock(key, exclusive=False)
