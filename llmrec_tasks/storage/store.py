"""One object-store interface over the local filesystem (``file://``) and S3 (``s3://``, boto3).

Keys are ``/``-separated paths relative to the store root. Writes are atomic per object: a
reader sees the old object or the new one, never a partial one.

Conditional writes (what promotion relies on):

- ``put_bytes(..., if_absent=True)`` creates only if the key does not exist;
  ``put_bytes(..., if_match=etag)`` replaces only if the object still has that ETag (from
  :meth:`get_with_etag`). The loser of a race gets :class:`PreconditionFailed`.
- Local: create-if-absent is an atomic ``link()``; compare-and-swap runs under an exclusive
  ``flock`` on a hidden lock file next to the object, then an atomic ``rename()``. Holds between
  threads and processes on one host's local filesystem (not across hosts on NFS).
- S3: ``IfNoneMatch: "*"`` / ``IfMatch`` headers on PutObject; atomic on AWS S3 and stores that
  implement them (MinIO, recent moto). A store that ignores the headers gives no guarantee.

Verified local files (what serving memory-maps): ``local_file(key, size, sha256)`` returns a path
on local disk whose content has that size and sha256, checked by ``stat`` first (a wrong size
fails before any hashing) and then a streamed sha256 (1 MiB reads, never the whole file in memory).
A ``file://`` store returns the object's own file (bundles are immutable and replaced only by
``rename()``, so a mapping of it stays valid). An S3 store returns its copy in the local cache
``$LLMREC_BUNDLE_CACHE`` (default ``~/.cache/llmrec/bundles``), at ``<bucket>/<prefix>/<key>``:
downloaded once, hashed while it streams into a hidden temp file, renamed into place only when
size and sha256 match. A cached copy is reused after the same stat + streamed-sha256 check (local
hashing is ~1 s per GB, far cheaper than a download, and catches a damaged disk or a hand-edited
file); one that fails it is downloaded again. Nothing prunes the cache: delete the folders of
versions no longer served (``<namespace>/bundles/<version>``), a mapped file stays readable.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from llmrec_tasks.core.errors import StoreError

log = logging.getLogger(__name__)

# Reading an S3 body can fail after the request succeeded (reset, truncated); botocore does
# not retry that part, so we do.
BODY_READ_ATTEMPTS = 4
# Files are streamed in parts of this size (S3: 5 MiB minimum, 10,000 parts: 640 GiB at most).
MULTIPART_CHUNK = 64 * 2**20
HASH_CHUNK = 1 << 20
BUNDLE_CACHE_ENV = "LLMREC_BUNDLE_CACHE"


class ObjectStore(Protocol):
    """What every stage needs from storage."""

    uri: str

    def put_bytes(
        self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None
    ) -> str:
        """Write atomically; returns the new ETag."""
        ...

    def get_bytes(self, key: str) -> bytes: ...
    def get_with_etag(self, key: str) -> tuple[bytes, str]: ...
    def put_file(self, key: str, path: Path, *, if_absent: bool = False) -> str: ...
    def get_file(self, key: str, path: Path) -> Path: ...
    def local_file(self, key: str, size: int, sha256: str) -> Path:
        """A local path holding the object, checked to have ``size`` bytes and this ``sha256``."""
        ...

    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def uri_for(self, key: str) -> str: ...


def check_key(key: str) -> str:
    """Refuse keys that would escape the store root."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StoreError(f"invalid object key {key!r}: no empty, '.' or '..' parts, no leading '/'")
    return key


class ObjectNotFound(StoreError):
    """The object does not exist."""


class PreconditionFailed(StoreError):
    """A conditional write lost: the object already exists (or changed)."""


class ContentMismatch(StoreError):
    """A file's size or sha256 is not the expected one."""

    def __init__(self, uri: str, what: str, actual: int | str, expected: int | str) -> None:
        super().__init__(f"{uri}: {what} is {actual}, expected {expected}")
        self.what = what  # "size" or "sha256"
        self.actual = actual
        self.expected = expected


def check_file(path: Path, size: int, sha256: str, uri: str) -> None:
    """ContentMismatch unless ``path`` has ``size`` bytes (stat, before reading) and this sha256
    (streamed)."""
    actual = path.stat().st_size
    if actual != size:
        raise ContentMismatch(uri, "size", actual, size)
    digest = file_sha256(path)
    if digest != sha256:
        raise ContentMismatch(uri, "sha256", digest, sha256)


def bundle_cache_dir() -> Path:
    """Where S3 objects are cached for local use: ``$LLMREC_BUNDLE_CACHE`` or ``~/.cache/llmrec/bundles``."""
    return Path(os.environ.get(BUNDLE_CACHE_ENV) or Path.home() / ".cache" / "llmrec" / "bundles")


def content_etag(data: bytes) -> str:
    """ETag of a local object: the sha256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


class LocalStore:
    """A folder on the local filesystem; the zero-setup default."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _temp_copy(self, path: Path, write: Callable[[Any], None]) -> str:
        """Write a hidden temp file next to ``path`` (same filesystem, so rename is atomic)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            os.unlink(tmp)
            raise
        return tmp

    def _commit(self, key: str, tmp: str, *, if_absent: bool, if_match: str | None) -> None:
        path = self._path(key)
        if if_absent:
            try:
                os.link(tmp, path)  # atomic create-if-absent
            except FileExistsError as exc:
                raise PreconditionFailed(f"{self.uri_for(key)} already exists") from exc
            finally:
                os.unlink(tmp)
            return
        if if_match is None:
            os.replace(tmp, path)
            return
        lock = path.parent / f".{path.name}.lock"
        with open(lock, "a+b") as lock_fh:
            fcntl.flock(lock_fh, fcntl.LOCK_EX)  # released when the file is closed
            try:
                current = content_etag(path.read_bytes()) if path.exists() else None
                if current != if_match:
                    raise PreconditionFailed(f"{self.uri_for(key)} changed since it was read")
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)

    def put_bytes(
        self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None
    ) -> str:
        path = self._path(key)
        tmp = self._temp_copy(path, lambda fh: fh.write(data))
        self._commit(key, tmp, if_absent=if_absent, if_match=if_match)
        return content_etag(data)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{self.uri_for(key)} does not exist") from exc

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        data = self.get_bytes(key)
        return data, content_etag(data)

    def put_file(self, key: str, path: Path, *, if_absent: bool = False) -> str:
        target = self._path(key)
        digest = hashlib.sha256()

        def copy(fh: Any) -> None:
            with open(path, "rb") as src:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    fh.write(chunk)

        tmp = self._temp_copy(target, copy)
        self._commit(key, tmp, if_absent=if_absent, if_match=None)
        return digest.hexdigest()  # = content_etag of the bytes written

    def get_file(self, key: str, path: Path) -> Path:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(f"{self.uri_for(key)} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)
        return path

    def local_file(self, key: str, size: int, sha256: str) -> Path:
        """The object's own file, once checked."""
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(f"{self.uri_for(key)} does not exist")
        check_file(path, size, sha256, self.uri_for(key))
        return path

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def uri_for(self, key: str) -> str:
        return f"{self.uri}/{key}"


def _transfer_config() -> Any:
    """boto3's managed transfers (threads, retried parts) with our part size."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_CHUNK, multipart_chunksize=MULTIPART_CHUNK)


class S3Store:
    """An S3 (or S3-compatible) bucket prefix through boto3.

    The client comes from :func:`llmrec_tasks.storage.aws.s3_client` (Airflow's ``aws_default`` inside a
    task, the standard AWS environment outside) unless a ready ``client`` is given.
    """

    def __init__(self, bucket: str, prefix: str = "", client: Any = None) -> None:
        if not bucket:
            raise StoreError("s3:// URI without a bucket: use s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        if client is None:
            from llmrec_tasks.storage.aws import s3_client

            client = s3_client()
        self.client = client

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, key: str, fn: Any, **kwargs: Any) -> Any:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except S3UploadFailedError as exc:  # a managed upload wraps the ClientError into its message
            if "NoSuchBucket" in str(exc):
                raise StoreError(
                    f"bucket {self.bucket!r} does not exist: create it or fix the store URI"
                ) from exc
            raise StoreError(f"S3 {what} {self.uri_for(key)} failed: {exc}") from exc
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                raise PreconditionFailed(f"{self.uri_for(key)} already exists or changed") from exc
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFound(f"{self.uri_for(key)} does not exist") from exc
            if code == "NoSuchBucket":
                raise StoreError(
                    f"bucket {self.bucket!r} does not exist: create it or fix the store URI"
                ) from exc
            raise StoreError(f"S3 {what} {self.uri_for(key)} failed: {code or exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"S3 {what} {self.uri_for(key)} failed after retries: {exc}") from exc

    def put_bytes(
        self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None
    ) -> str:
        extra: dict[str, str] = {}
        if if_absent:
            extra["IfNoneMatch"] = "*"
        if if_match is not None:
            extra["IfMatch"] = if_match
        response = self._call("put", key, self.client.put_object, Key=self._key(key), Body=data, **extra)
        return str(response.get("ETag", ""))

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        from botocore.exceptions import BotoCoreError

        attempt = 1
        while True:
            response = self._call("get", key, self.client.get_object, Key=self._key(key))
            try:
                return response["Body"].read(), str(response.get("ETag", ""))
            except BotoCoreError as exc:
                if attempt >= BODY_READ_ATTEMPTS:
                    raise StoreError(f"S3 get {self.uri_for(key)} failed reading the body: {exc}") from exc
                log.warning("reading %s failed (%s); retrying", self.uri_for(key), exc)
                time.sleep(0.2 * 2**attempt)
                attempt += 1

    def get_bytes(self, key: str) -> bytes:
        return self.get_with_etag(key)[0]

    def put_file(self, key: str, path: Path, *, if_absent: bool = False) -> str:
        """Stream a file up, in parts above ``MULTIPART_CHUNK``: memory stays bounded whatever its size."""
        if if_absent:
            return self._put_file_if_absent(key, Path(path))
        self._call(
            "put",
            key,
            self.client.upload_file,
            Filename=str(path),
            Key=self._key(key),
            Config=_transfer_config(),
        )
        return str(self._call("head", key, self.client.head_object, Key=self._key(key)).get("ETag", ""))

    def _put_file_if_absent(self, key: str, path: Path) -> str:
        """Create-if-absent for any size: one conditional PutObject, or a multipart upload whose
        completion carries the condition (boto3's managed upload cannot pass it)."""
        if path.stat().st_size <= MULTIPART_CHUNK:
            with open(path, "rb") as fh:
                response = self._call(
                    "put", key, self.client.put_object, Key=self._key(key), Body=fh, IfNoneMatch="*"
                )
            return str(response.get("ETag", ""))
        upload = self._call("put", key, self.client.create_multipart_upload, Key=self._key(key))["UploadId"]
        try:
            parts = []
            with open(path, "rb") as fh:
                while chunk := fh.read(MULTIPART_CHUNK):
                    number = len(parts) + 1
                    part = self._call(
                        "put",
                        key,
                        self.client.upload_part,
                        Key=self._key(key),
                        UploadId=upload,
                        PartNumber=number,
                        Body=chunk,
                    )
                    parts.append({"ETag": part["ETag"], "PartNumber": number})
            response = self._call(
                "put",
                key,
                self.client.complete_multipart_upload,
                Key=self._key(key),
                UploadId=upload,
                MultipartUpload={"Parts": parts},
                IfNoneMatch="*",
            )
        except BaseException:
            self._abort_upload(key, upload)
            raise
        return str(response.get("ETag", ""))

    def _abort_upload(self, key: str, upload: str) -> None:
        """Drop an unfinished multipart upload's parts (a bucket lifecycle rule catches what this misses)."""
        try:
            self._call("abort", key, self.client.abort_multipart_upload, Key=self._key(key), UploadId=upload)
        except StoreError as exc:
            log.warning("could not abort the multipart upload of %s: %s", self.uri_for(key), exc)

    def get_file(self, key: str, path: Path) -> Path:
        """Stream an object down to ``path`` (ranged parts; the file appears complete or not at all)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self._call(
            "get",
            key,
            self.client.download_file,
            Key=self._key(key),
            Filename=str(path),
            Config=_transfer_config(),
        )
        return path

    def cache_path(self, key: str) -> Path:
        """Where :meth:`local_file` keeps its copy of ``key``."""
        return bundle_cache_dir() / self.bucket / self._key(key)

    def local_file(self, key: str, size: int, sha256: str) -> Path:
        """The cached copy of the object: reused when it passes the check, else (re)downloaded."""
        path = self.cache_path(key)
        if path.is_file():
            try:
                check_file(path, size, sha256, path.as_uri())
                return path
            except ContentMismatch as exc:
                log.warning(
                    "cached copy of %s fails its check (%s): downloading it again", self.uri_for(key), exc
                )
        try:
            self._download_checked(key, path, size, sha256)
        except OSError as exc:
            raise StoreError(
                f"cannot write {self.uri_for(key)} into the bundle cache at {path.parent}: {exc}; "
                f"free disk space or point {BUNDLE_CACHE_ENV} at a writable folder"
            ) from exc
        return path

    def _download_checked(self, key: str, path: Path, size: int, sha256: str) -> None:
        """Stream the object into a hidden temp file next to ``path``, hashing it on the way;
        rename it into place only when size and sha256 match."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                digest = self._stream_hashing(key, fh, size)
                written = fh.tell()
                fh.flush()
                os.fsync(fh.fileno())
            if written != size:
                raise ContentMismatch(self.uri_for(key), "size", written, size)
            if digest != sha256:
                raise ContentMismatch(self.uri_for(key), "sha256", digest, sha256)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _stream_hashing(self, key: str, fh: Any, size: int) -> str:
        """Write the object's body to ``fh`` (from the start again after a failed body read) and
        return its sha256; a ContentLength other than ``size`` fails before the body is read."""
        from botocore.exceptions import BotoCoreError

        attempt = 1
        while True:
            response = self._call("get", key, self.client.get_object, Key=self._key(key))
            length = int(response.get("ContentLength", -1))
            if length != size:
                response["Body"].close()
                raise ContentMismatch(self.uri_for(key), "size", length, size)
            fh.seek(0)
            fh.truncate()
            try:
                return _copy_hashing(response["Body"].iter_chunks(HASH_CHUNK), fh)
            except BotoCoreError as exc:
                if attempt >= BODY_READ_ATTEMPTS:
                    raise StoreError(f"S3 get {self.uri_for(key)} failed reading the body: {exc}") from exc
                log.warning("reading %s failed (%s); retrying", self.uri_for(key), exc)
                time.sleep(0.2 * 2**attempt)
                attempt += 1

    def exists(self, key: str) -> bool:
        try:
            self._call("head", key, self.client.head_object, Key=self._key(key))
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix.rstrip("/")) + "/" if prefix else (f"{self.prefix}/" if self.prefix else "")
        keys: list[str] = []
        token: dict[str, str] = {}
        strip = len(self.prefix) + 1 if self.prefix else 0
        while True:
            page = self._call("list", prefix or ".", self.client.list_objects_v2, Prefix=full, **token)
            keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
            if not page.get("IsTruncated"):
                return sorted(keys)
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Key=self._key(key))

    def uri_for(self, key: str) -> str:
        return f"{self.uri}/{key}"


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_hashing(chunks: Iterable[bytes], out: Any) -> str:
    """Write ``chunks`` to ``out``; the sha256 of what was written."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
        out.write(chunk)
    return digest.hexdigest()


def open_store(uri: str, *, s3_client: Any = None) -> ObjectStore:
    """Open ``file:///path``, a plain local path, or ``s3://bucket/prefix``."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return S3Store(parsed.netloc, parsed.path, client=s3_client)
    if parsed.scheme == "file":
        return LocalStore(Path(parsed.path))
    if parsed.scheme == "":
        return LocalStore(Path(uri))
    raise StoreError(f"unsupported store URI {uri!r}: use file:///path or s3://bucket/prefix")


def split_uri(uri: str) -> tuple[ObjectStore, str]:
    """Split an object URI into (store of its parent folder, object name)."""
    head, _, name = uri.rstrip("/").rpartition("/")
    if not name:
        raise StoreError(f"{uri!r} names no object")
    return open_store(head), name
