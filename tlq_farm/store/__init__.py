"""Object stores holding a job's state: a local folder (LocalStore) or an S3 bucket (S3Store).

open_store(url) picks one from a URL: "s3://bucket/prefix" or a folder path.
"""

from __future__ import annotations

import os

from tlq_farm.store.base import Commit, CorruptObject, NotCommitted, Store, StoreError, StoreUnavailable
from tlq_farm.store.local import LocalStore

__all__ = [
    "Commit",
    "CorruptObject",
    "LocalStore",
    "NotCommitted",
    "Store",
    "StoreError",
    "StoreUnavailable",
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


def open_store(url: str | os.PathLike, **s3_options) -> Store:
    """The store at `url`: "s3://bucket/prefix" -> S3Store, anything else -> LocalStore (folder created).

    A "file://" prefix is accepted for folders; "~" is expanded. s3_options go to S3Store (endpoint_url,
    region, timeouts...).
    """
    text = os.fspath(url)
    if not text:
        raise ValueError("store URL is empty: give a folder path or s3://BUCKET/PREFIX (TLQ_STORE_URL)")
    if text.startswith("s3://"):
        from tlq_farm.store.s3 import S3Store

        bucket, prefix = parse_s3_url(text)
        return S3Store(bucket, prefix, **s3_options)
    if "://" in text and not text.startswith("file://"):
        raise ValueError(f"store URL {text!r} has an unsupported scheme: use s3://BUCKET/PREFIX or a folder path")
    if s3_options:
        raise ValueError(f"options {sorted(s3_options)} only apply to s3:// stores, not to the folder {text!r}")
    return LocalStore(text[len("file://") :] if text.startswith("file://") else text)
