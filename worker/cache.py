"""A size-bounded local cache of store objects, by content: what a worker wrote or read is not downloaded again.

Entries are named by sha256, so a cached copy is valid for any key whose commit marker names that digest;
the marker is still read on every get (a rewrite or a corrupt-and-deleted object is seen at once). The
oldest-used files go first when the cache exceeds its size.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tlq_farm.store import Store


class CachedStore:
    """`store` with get_bytes served from a local folder when the committed digest is cached there.

    Every other attribute is the wrapped store's; put_bytes writes through and keeps a copy.
    """

    def __init__(self, store: Store, folder: str | os.PathLike, max_bytes: int):
        self._store = store
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0

    def __getattr__(self, name):
        return getattr(self._store, name)

    def _path(self, digest: str) -> Path:
        return self.folder / digest[:2] / digest

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
        self._evict()

    def _evict(self) -> None:
        files = [p for p in self.folder.glob("*/*") if p.is_file() and not p.name.startswith(".")]
        total = sum(p.stat().st_size for p in files)
        for p in sorted(files, key=lambda p: p.stat().st_atime):
            if total <= self.max_bytes:
                break
            total -= p.stat().st_size
            p.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> str:
        digest = self._store.put_bytes(key, data)
        self._keep(digest, bytes(data))
        return digest

    def get_bytes(self, key: str) -> bytes:
        info = self._store.commit_info(key)
        if info is None:
            return self._store.get_bytes(key)  # raises NotCommitted / CorruptObject with the store's message
        path = self._path(info.sha256)
        try:
            data = path.read_bytes()
        except OSError:  # not cached, or evicted by another process meanwhile
            data = None
        if data is not None:
            if hashlib.sha256(data).hexdigest() == info.sha256:
                self.hits += 1
                os.utime(path)
                return data
            path.unlink(missing_ok=True)  # a damaged cache file: fetch the object again
        self.misses += 1
        data = self._store.get_bytes(key)
        self._keep(hashlib.sha256(data).hexdigest(), data)
        return data

