"""Object stores holding a job's state: a local folder (LocalStore) or an S3 bucket (S3Store).

open_store(url) picks one from a URL: "s3://bucket/prefix" or a folder path.
"""

from __future__ import annotations

import os
from pathlib import Path

from tlq_farm.store.base import (Commit, CorruptObject, NotCommitted, Store, StoreError, StoreMissing,
                                 StoreUnavailable)
from tlq_farm.store.local import LocalStore

__all__ = [
    "Commit",
    "CorruptObject",
    "LocalStore",
    "NotCommitted",
    "Store",
    "StoreError",
    "StoreMissing",
    "StoreUnavailable",
    "local_folder",
    "open_store",
    "parse_s3_url",
]


def parse_s3_url(url: str) -> tuple[str, str]:
    """'s3://bucket/some/prefix' -> ('bucket', 'some/prefix')."""
    rest = url[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(
            f"store URL {url!r} names no bucket: write s3://BUCKET or s3://BUCKET/PREFIX "
            "(for example s3://tlq-runs/team-a)"
        )
    return bucket, prefix.strip("/")


def _check_url(text: str) -> None:
    if not text:
        raise ValueError("store URL is empty: give a folder path or s3://BUCKET/PREFIX (TLQ_STORE_URL)")
    if "://" in text and not text.startswith(("s3://", "file://")):
        raise ValueError(f"store URL {text!r} has an unsupported scheme: use s3://BUCKET/PREFIX or a folder path")


def local_folder(url: str | os.PathLike) -> Path | None:
    """The absolute folder of a folder store URL (None for s3://), without touching the disk's contents."""
    text = os.fspath(url)
    _check_url(text)
    if text.startswith("s3://"):
        return None
    return Path(text[len("file://") :] if text.startswith("file://") else text).expanduser().resolve()


def open_store(url: str | os.PathLike, *, create: bool | None = None, **s3_options) -> Store:
    """The store at `url`: "s3://bucket/prefix" -> S3Store, anything else -> LocalStore.

    create=None (the library default): a missing folder is created, a bucket is neither checked nor
    created (a missing one fails on first use). create=False: the folder or bucket must exist, else
    StoreMissing names it; nothing is created. create=True: a missing folder or bucket is created.
    A "file://" prefix is accepted for folders; "~" is expanded. s3_options go to S3Store (endpoint_url,
    region, timeouts...).
    """
    text = os.fspath(url)
    _check_url(text)
    if text.startswith("s3://"):
        from tlq_farm.store.s3 import S3Store

        bucket, prefix = parse_s3_url(text)
        store = S3Store(bucket, prefix, **s3_options)
        if create:
            store.ensure_bucket()
        elif create is False:
            store.check_bucket()
        return store
    if s3_options:
        raise ValueError(f"options {sorted(s3_options)} only apply to s3:// stores, not to the folder {text!r}")
    return LocalStore(local_folder(text), create=create is not False)
