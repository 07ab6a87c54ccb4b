"""One object-store interface over the local filesystem (``file://``) and S3 (``s3://``, boto3).

Keys are ``/``-separated paths relative to the store root. Writes are atomic per object: a
reader sees the old object or the new one, never a partial one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from llmrec_tasks.errors import StoreError


class ObjectStore(Protocol):
    """What every stage needs from storage."""

    uri: str

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def put_file(self, key: str, path: Path) -> None: ...
    def get_file(self, key: str, path: Path) -> Path: ...
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


class PreconditionFailed(StoreError):
    """A conditional write lost: the object already exists (or changed)."""


class LocalStore:
    """A folder on the local filesystem; the zero-setup default."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if if_absent:
            try:
                os.link(tmp, path)  # atomic create-if-absent
            except FileExistsError as exc:
                raise PreconditionFailed(f"{self.uri_for(key)} already exists") from exc
            finally:
                os.unlink(tmp)
        else:
            os.replace(tmp, path)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise StoreError(f"{self.uri_for(key)} does not exist") from exc

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)

    def get_file(self, key: str, path: Path) -> Path:
        source = self._path(key)
        if not source.exists():
            raise StoreError(f"{self.uri_for(key)} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)
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


class S3Store:
    """An S3 (or S3-compatible) bucket prefix through boto3.

    Credentials, region and endpoint come from the standard AWS environment (``AWS_ENDPOINT_URL``
    included) unless a ready ``client`` is given, e.g. from Airflow's ``aws_default`` connection.
    """

    def __init__(self, bucket: str, prefix: str = "", client: Any = None) -> None:
        if not bucket:
            raise StoreError("s3:// URI without a bucket: use s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        if client is None:
            import boto3
            from botocore.config import Config

            client = boto3.client(
                "s3", config=Config(retries={"max_attempts": 8, "mode": "standard"}, connect_timeout=5)
            )
        self.client = client

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, key: str, fn: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                raise PreconditionFailed(f"{self.uri_for(key)} already exists or changed") from exc
            if code in ("NoSuchKey", "404", "NotFound"):
                raise StoreError(f"{self.uri_for(key)} does not exist") from exc
            raise StoreError(f"S3 {what} {self.uri_for(key)} failed: {code or exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"S3 {what} {self.uri_for(key)} failed: {exc}") from exc

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        extra = {"IfNoneMatch": "*"} if if_absent else {}
        self._call("put", key, self.client.put_object, Key=self._key(key), Body=data, **extra)

    def get_bytes(self, key: str) -> bytes:
        response = self._call("get", key, self.client.get_object, Key=self._key(key))
        return response["Body"].read()

    def put_file(self, key: str, path: Path) -> None:
        self.put_bytes(key, Path(path).read_bytes())

    def get_file(self, key: str, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.get_bytes(key))
        return path

    def exists(self, key: str) -> bool:
        try:
            self._call("head", key, self.client.head_object, Key=self._key(key))
        except PreconditionFailed:
            raise
        except StoreError as exc:
            if "does not exist" in str(exc):
                return False
            raise
        return True

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix.rstrip("/")) + "/" if prefix else (f"{self.prefix}/" if self.prefix else "")
        keys: list[str] = []
        token: dict[str, str] = {}
        while True:
            page = self._call("list", prefix or ".", self.client.list_objects_v2, Prefix=full, **token)
            strip = len(self.prefix) + 1 if self.prefix else 0
            keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
            if not page.get("IsTruncated"):
                return sorted(keys)
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Key=self._key(key))

    def uri_for(self, key: str) -> str:
        return f"{self.uri}/{key}"


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
