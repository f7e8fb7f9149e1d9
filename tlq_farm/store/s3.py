"""S3Store: an S3 bucket (AWS, MinIO, Ceph, ...) as an object store.

The only module of tlq_farm that imports boto3, and only when an S3Store is made. S3 writes of one
object are atomic (a reader sees the old or the new object), so the commit protocol of base.Store needs
no locks here; concurrent writers of different bytes to one key can at worst make a reader see a mismatch,
which it reports as corrupt and which costs one recomputation, never a wrong read.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from tlq_farm.store.base import Store, StoreError, StoreMissing, StoreUnavailable, sha256_file
from tlq_farm.store.keys import COMMIT_SUFFIX

MiB = 1 << 20
DEFAULT_MULTIPART_THRESHOLD = 64 * MiB
DELETE_BATCH = 1000  # the most keys one DeleteObjects request takes
WRITTEN_VERSIONS_KEPT = 1024  # versions of objects just written, awaiting CachedStore.put_bytes

_CREDENTIAL_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "403",
}
_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}
_MISSING_BUCKET_CODES = {"404", "NoSuchBucket", "NotFound"}


_loader = None
_loader_lock = threading.Lock()


def _client(**arguments):
    """An S3 client from a fresh boto3 session (so credentials and environment are read anew) that
    shares one botocore data loader: loading the S3 service model is what makes a new client slow."""
    global _loader
    import boto3
    import botocore.loaders
    import botocore.session

    with _loader_lock:
        if _loader is None:
            _loader = botocore.loaders.create_loader()
    core = botocore.session.Session()
    core.register_component("data_loader", _loader)
    return boto3.session.Session(botocore_session=core).client("s3", **arguments)


def _error_code(error: Exception) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _http_status(error: Exception) -> int:
    response = getattr(error, "response", None) or {}
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


class S3Store(Store):
    """Objects under `prefix` in `bucket`.

    endpoint_url: an S3-compatible service (MinIO...); defaults to AWS_ENDPOINT_URL, else AWS itself.
    region: defaults to AWS_REGION / AWS_DEFAULT_REGION, else us-east-1.
    Credentials come from the usual boto3 chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profiles...).
    Nothing is created implicitly: check_bucket() says whether the bucket exists, ensure_bucket() creates it.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        *,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        multipart_chunksize: int | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 120.0,
        max_attempts: int = 5,
    ):
        if not bucket or "/" in bucket:
            raise ValueError(f"S3 bucket name {bucket!r} is invalid: give the bare bucket name, e.g. 'my-bucket'")
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        config = Config(
            region_name=self.region,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": "standard", "max_attempts": max_attempts},
            # Several S3-compatible stores reject the CRC checksums boto3 adds by default; the commit
            # protocol carries its own sha256, verified on every read.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            # Custom endpoints (MinIO-style) are usually reached by path, not by bucket host name.
            s3={"addressing_style": "path" if self.endpoint_url else "auto"},
        )
        self.client = _client(endpoint_url=self.endpoint_url, config=config)
        self._count_lock = threading.Lock()
        self.client.meta.events.register("before-call.s3", self._count_request)  # once per call, not per retry
        self._versions_written: dict[str, str] = {}
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize or multipart_threshold,
        )

    def _count_request(self, **_) -> None:
        with self._count_lock:  # prefetch sends requests from several threads
            self.requests += 1

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint_url={self.endpoint_url!r})"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _full(self, raw_key: str) -> str:
        return f"{self.prefix}/{raw_key}" if self.prefix else raw_key

    # ---------------------------------------------------------------------------------- errors

    def _where(self) -> str:
        return f"{self.url} at {self.endpoint_url or 'AWS S3'}"

    def _translate(self, error: BaseException, action: str) -> StoreError | None:
        """A StoreError for a boto3/botocore error (None when it is not one of theirs)."""
        from boto3.exceptions import S3UploadFailedError
        from botocore import exceptions as bce

        if isinstance(error, (bce.NoCredentialsError, bce.PartialCredentialsError, bce.CredentialRetrievalError)):
            return StoreUnavailable(
                f"cannot {action} in {self._where()}: no usable AWS credentials ({error}); set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            )
        if isinstance(error, (bce.ConnectionError, bce.HTTPClientError)):
            return StoreUnavailable(
                f"cannot {action} in {self._where()}: the endpoint cannot be reached ({error}); check the "
                "endpoint URL (endpoint_url or AWS_ENDPOINT_URL), that the service runs, and the network"
            )
        if isinstance(error, bce.ClientError):
            code, status = _error_code(error), _http_status(error)
            if code == "NoSuchBucket":
                return StoreUnavailable(
                    f"cannot {action} in {self._where()}: bucket {self.bucket!r} does not exist; check the "
                    "bucket name (TLQ_STORE_URL) or create it (S3Store.ensure_bucket())"
                )
            if code in _CREDENTIAL_CODES or status == 403:
                return StoreUnavailable(
                    f"cannot {action} in {self._where()}: access refused ({code}); check AWS_ACCESS_KEY_ID, "
                    "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), and the bucket's permissions"
                )
            if status >= 500 or code in {"SlowDown", "ServiceUnavailable", "InternalError"}:
                return StoreUnavailable(
                    f"cannot {action} in {self._where()}: the service keeps failing ({code}, HTTP {status}) "
                    "after retries; check the service's health and retry later"
                )
            return StoreError(f"cannot {action} in {self._where()}: {code or 'error'} (HTTP {status}): {error}")
        if isinstance(error, S3UploadFailedError):
            cause = error.__cause__ or error.__context__
            translated = self._translate(cause, action) if cause is not None else None
            return translated or StoreError(f"cannot {action} in {self._where()}: {error}")
        if isinstance(error, bce.BotoCoreError):
            return StoreError(f"cannot {action} in {self._where()}: {error}")
        return None

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except StoreError:
            raise
        except Exception as error:
            translated = self._translate(error, action)
            if translated is None:
                raise
            raise translated from error

    def _is_missing_key(self, error: Exception) -> bool:
        from botocore.exceptions import ClientError

        return isinstance(error, ClientError) and _error_code(error) in _MISSING_KEY_CODES

    # ---------------------------------------------------------------------------------- bucket

    def _bucket_exists(self) -> bool:
        from botocore.exceptions import ClientError

        with self._errors(f"check bucket {self.bucket!r}"):
            try:
                self.client.head_bucket(Bucket=self.bucket)
                return True
            except ClientError as error:
                if _error_code(error) not in _MISSING_BUCKET_CODES:
                    raise
        return False

    def check_bucket(self) -> None:
        """Raise StoreMissing when the bucket does not exist (and StoreUnavailable when it cannot be
        reached or is refused); creates nothing."""
        if not self._bucket_exists():
            where = self.endpoint_url or "AWS S3"
            raise StoreMissing(f"bucket {self.bucket!r} does not exist at {where}: check the bucket name, or "
                               "create it (S3Store.ensure_bucket())", what=f"bucket {self.bucket!r} does not exist at {where}")

    def ensure_bucket(self) -> None:
        """Create the bucket when it does not exist (the only thing S3Store ever creates)."""
        from botocore.exceptions import ClientError

        if self._bucket_exists():
            return
        arguments: dict = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            arguments["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        with self._errors(f"create bucket {self.bucket!r}"):
            try:
                self.client.create_bucket(**arguments)
            except ClientError as error:
                if _error_code(error) not in {"BucketAlreadyOwnedByYou"}:
                    raise

    # ---------------------------------------------------------------------------------- primitives

    def _unless_missing(self, what: str, call):
        """call(), or None when S3 says the key does not exist; other errors as _errors says."""
        with self._errors(what):
            try:
                return call()
            except Exception as error:
                if self._is_missing_key(error):
                    return None
                raise

    def _read_raw(self, raw_key: str) -> bytes | None:
        return self._unless_missing(f"read {raw_key!r}", lambda: self.client.get_object(
            Bucket=self.bucket, Key=self._full(raw_key))["Body"].read())

    def _write_raw(self, raw_key: str, data: bytes) -> None:
        with self._errors(f"write {raw_key!r}"):
            response = self.client.put_object(Bucket=self.bucket, Key=self._full(raw_key), Body=data)
        if not raw_key.endswith(COMMIT_SUFFIX) and response.get("ETag"):
            # The token _object_version would read back with a HEAD (ETag and size), kept for one taker.
            self._versions_written[raw_key] = f"{response['ETag']}:{len(data)}"
            while len(self._versions_written) > WRITTEN_VERSIONS_KEPT:
                self._versions_written.pop(next(iter(self._versions_written)), None)

    def _written_version(self, raw_key: str) -> str | None:
        return self._versions_written.pop(raw_key, None)

    def _delete_raw(self, raw_key: str) -> None:
        with self._errors(f"delete {raw_key!r}"):
            self.client.delete_object(Bucket=self.bucket, Key=self._full(raw_key))

    def _object_version(self, raw_key: str) -> str | None:
        # The ETag changes whenever the content does; where it is no content hash it changes on every write,
        # which costs a reader one re-read. A missing bucket answers 404 here too: the re-read says why.
        head = self._unless_missing(f"look up {raw_key!r}", lambda: self.client.head_object(
            Bucket=self.bucket, Key=self._full(raw_key)))
        return None if head is None else f"{head.get('ETag', '')}:{head.get('ContentLength', '')}"

    def _exists_raw(self, raw_key: str) -> bool:
        # A GET of the first byte, not HEAD: HEAD answers a bare 404 for a missing bucket too, which would
        # pass for "not there" instead of saying the bucket is wrong, where a GET's error names NoSuchKey or
        # NoSuchBucket. Nor a one-key listing: every marker lookup (a job makes thousands) would be a LIST
        # request, which S3 bills at 12.5 x a GET (moto's server spends 1.2 to 1.6 x a GET's CPU on one).
        # An empty object (a flag) answers InvalidRange: it exists.
        from botocore.exceptions import ClientError

        full = self._full(raw_key)
        with self._errors(f"look up {raw_key!r}"):
            try:
                self.client.get_object(Bucket=self.bucket, Key=full, Range="bytes=0-0")["Body"].read()
                return True
            except ClientError as error:
                code = _error_code(error)
                if code == "InvalidRange":
                    return True
                if code == "NoSuchKey":
                    return False
                if code not in _MISSING_KEY_CODES:
                    raise
            # A bare 404 (a store that sends no error body): the listing tells a missing key from a bucket.
            response = self.client.list_objects_v2(Bucket=self.bucket, Prefix=full, MaxKeys=1)
        return any(item["Key"] == full for item in response.get("Contents", []))

    def _list_raw(self, prefix: str) -> list[str]:
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        found = []
        with self._errors(f"list {prefix!r}"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full_prefix):
                found.extend(item["Key"][strip:] for item in page.get("Contents", []))
        return found

    def _delete_many(self, raw_keys: list[str]) -> None:
        from botocore.exceptions import ClientError

        for start in range(0, len(raw_keys), DELETE_BATCH):
            batch = raw_keys[start : start + DELETE_BATCH]
            with self._errors(f"delete {len(batch)} objects"):
                try:
                    response = self.client.delete_objects(
                        Bucket=self.bucket,
                        Delete={"Objects": [{"Key": self._full(raw)} for raw in batch], "Quiet": True},
                    )
                except ClientError as error:
                    # Some S3-compatible stores refuse batch deletes (or their checksum header): go one by one.
                    if _error_code(error) in {"NoSuchBucket"} | _CREDENTIAL_CODES:
                        raise
                    super()._delete_many(batch)
                    continue
            failed = response.get("Errors", [])
            if failed:
                first = failed[0]
                raise StoreError(
                    f"cannot delete {len(failed)} objects in {self._where()}, first {first.get('Key')!r}: "
                    f"{first.get('Code')} {first.get('Message')}; check the bucket's permissions"
                )

    def _upload_file(self, raw_key: str, path: Path) -> tuple[str, int]:
        digest, size = sha256_file(path)
        with self._errors(f"upload {path} to {raw_key!r}"):
            self.client.upload_file(str(path), self.bucket, self._full(raw_key), Config=self.transfer_config)
        return digest, size

    def _download_file(self, raw_key: str, path: Path) -> bool:
        with self._errors(f"download {raw_key!r}"):
            try:
                self.client.download_file(self.bucket, self._full(raw_key), str(path), Config=self.transfer_config)
            except Exception as error:
                if self._is_missing_key(error):
                    return False
                raise
        return True
