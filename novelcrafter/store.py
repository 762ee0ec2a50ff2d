"""The object store: one interface, two backends chosen by URL.

* a path or ``file://…`` — a local directory (the embedded default);
* ``s3://bucket/prefix`` — MinIO or any S3, through the ``minio`` client
  (endpoint and credentials from the environment, see :mod:`novelcrafter.config`).

Writes are atomic: a reader never sees a half-written object. On the local
backend a write goes to a hidden temporary file in the same folder, is fsynced
and renamed into place; on S3 a PUT is atomic by the protocol. Pointers
(``latest``) must be written after what they point to; :meth:`Store.put_if_absent`
gives write-once semantics for claims and immutable versions.

Transient failures (store unreachable) are retried with exponential backoff for
up to ``retry_seconds``; then a :class:`~novelcrafter.errors.StoreError` says what failed.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from novelcrafter.errors import InvalidArgument, NotFound, StoreError
from novelcrafter.logs import get_logger
from novelcrafter.retry import STORE_BACKOFF, retry

log = get_logger(__name__)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a local file, read in 1 MiB blocks (checksums of what we upload)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


T = TypeVar("T")
_TMP_MARK = ".nc-tmp-"
_CTRL = re.compile(r"[\x00-\x1f\x7f]")
MAX_KEY_LEN = 900


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: float  # unix seconds
    etag: str = ""


def validate_key(key: str, *, prefix: bool = False) -> str:
    """Reject keys that could escape the store root or confuse a backend."""
    if not isinstance(key, str) or (not key and not prefix):
        raise InvalidArgument("invalid store key: empty")
    if len(key) > MAX_KEY_LEN:
        raise InvalidArgument(f"invalid store key: longer than {MAX_KEY_LEN} characters")
    if key.startswith("/") or "\\" in key or _CTRL.search(key):
        raise InvalidArgument(f"invalid store key {key[:80]!r}: absolute, backslash or control character")
    parts = key.split("/")
    body = parts[:-1] if (prefix and key.endswith("/")) else parts
    if key and any(p in ("", ".", "..") for p in body):
        raise InvalidArgument(f"invalid store key {key[:80]!r}: empty, '.' or '..' segment")
    if any(p.startswith(_TMP_MARK) for p in parts):
        raise InvalidArgument(f"invalid store key {key[:80]!r}: reserved name")
    return key


class Store(ABC):
    """Object store interface shared by every service."""

    url: str

    def __init__(self, retry_seconds: float = 30.0) -> None:
        self.retry_seconds = retry_seconds

    # -- primitives implemented by backends --------------------------------------------------
    @abstractmethod
    def _put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def _put_if_absent(self, key: str, data: bytes) -> bool: ...

    @abstractmethod
    def _put_file(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def _get(self, key: str) -> bytes: ...

    @abstractmethod
    def _iter(self, key: str, chunk_size: int) -> Iterator[bytes]: ...

    @abstractmethod
    def _list(self, prefix: str) -> list[str]: ...

    @abstractmethod
    def _stat(self, key: str) -> ObjectInfo: ...

    @abstractmethod
    def _copy(self, src: str, dst: str) -> None: ...

    @abstractmethod
    def _delete(self, key: str) -> None: ...

    @abstractmethod
    def _is_transient(self, exc: BaseException) -> bool: ...

    # -- public API ---------------------------------------------------------------------------
    def put(self, key: str, data: bytes | str) -> None:
        """Atomically write ``data`` at ``key`` (replacing any previous object)."""
        validate_key(key)
        payload = data.encode() if isinstance(data, str) else bytes(data)
        self._retry(f"write {key}", lambda: self._put(key, payload))

    def put_json(self, key: str, obj: Any) -> None:
        self.put(key, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def put_file(self, key: str, path: str | Path) -> None:
        """Atomically upload a local file."""
        validate_key(key)
        self._retry(f"write {key}", lambda: self._put_file(key, Path(path)))

    def put_if_absent(self, key: str, data: bytes | str) -> bool:
        """Write only if nothing is at ``key``; return whether this call wrote it."""
        validate_key(key)
        payload = data.encode() if isinstance(data, str) else bytes(data)
        return self._retry(f"write {key}", lambda: self._put_if_absent(key, payload))

    def get(self, key: str) -> bytes:
        """The whole object; :class:`NotFound` when absent."""
        validate_key(key)
        return self._retry(f"read {key}", lambda: self._get(key))

    def get_json(self, key: str) -> Any:
        data = self.get(key)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise StoreError(f"corrupt JSON object {key}: {exc}") from exc

    def get_text(self, key: str) -> str:
        return self.get(key).decode("utf-8")

    def stream(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Iterate over the object's bytes without holding it all in memory."""
        validate_key(key)
        self.stat(key)  # NotFound early, with retries
        return self._iter(key, chunk_size)

    def download(self, key: str, path: str | Path) -> Path:
        """Copy an object to a local file (atomically: a partial download never appears)."""
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)

        def _do() -> Path:
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=_TMP_MARK)
            try:
                with os.fdopen(fd, "wb") as fh:
                    for chunk in self._iter(key, 1 << 20):
                        fh.write(chunk)
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return dest

        validate_key(key)
        self.stat(key)
        return self._retry(f"read {key}", _do)

    def list(self, prefix: str = "") -> list[str]:
        """All keys under ``prefix`` (recursive), sorted."""
        validate_key(prefix, prefix=True)
        return sorted(self._retry(f"list {prefix or '/'}", lambda: self._list(prefix)))

    def stat(self, key: str) -> ObjectInfo:
        validate_key(key)
        return self._retry(f"stat {key}", lambda: self._stat(key))

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
            return True
        except NotFound:
            return False

    def copy(self, src_key: str, dst_key: str) -> None:
        """Copy the object at ``src_key`` to ``dst_key`` inside the store (on S3 the server copies:
        the bytes never travel through this process). Atomic like every write: a reader of
        ``dst_key`` sees the previous object or the whole copy. :class:`NotFound` when
        ``src_key`` is absent."""
        validate_key(src_key)
        validate_key(dst_key)
        self._retry(f"copy {src_key} to {dst_key}", lambda: self._copy(src_key, dst_key))

    def delete(self, key: str) -> None:
        """Delete an object; deleting a missing object is not an error."""
        validate_key(key)
        self._retry(f"delete {key}", lambda: self._delete(key))

    def delete_prefix(self, prefix: str) -> int:
        if not prefix or not prefix.endswith("/"):
            raise InvalidArgument("delete_prefix needs a folder prefix ending in '/'")
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)

    # -- retries ------------------------------------------------------------------------------
    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        def transient(exc: Exception) -> bool:
            return not isinstance(exc, (NotFound, InvalidArgument, StoreError)) and self._is_transient(exc)

        def warn(attempt: int, exc: Exception) -> None:
            if attempt == 1 or attempt % 5 == 0:
                log.warning(f"store {what} failed, retrying: {exc}", extra={"fields": {"attempt": attempt}})

        try:
            return retry(
                fn,
                backoff=STORE_BACKOFF,
                retryable=transient,
                deadline_seconds=self.retry_seconds,
                on_retry=warn,
            )
        except (NotFound, InvalidArgument, StoreError):
            raise
        except Exception as exc:
            raise self._translate(what, exc) from exc

    def _translate(self, what: str, exc: BaseException) -> StoreError:
        return StoreError(f"object store {self.url}: cannot {what}: {exc}")


class LocalStore(Store):
    """A directory on the local filesystem."""

    def __init__(self, root: str | Path, retry_seconds: float = 30.0) -> None:
        super().__init__(retry_seconds)
        self.root = Path(root).expanduser().resolve()
        self.url = f"file://{self.root}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create store directory {self.root}: {exc.strerror or exc}") from exc

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if path != self.root and self.root not in path.parents:
            raise InvalidArgument(f"invalid store key {key[:80]!r}: escapes the store root")
        return path

    def _write_tmp(self, dest: Path, writer: Callable[[Any], None]) -> str:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=_TMP_MARK)
        try:
            with os.fdopen(fd, "wb") as fh:
                writer(fh)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return tmp

    def _put(self, key: str, data: bytes) -> None:
        dest = self._path(key)
        tmp = self._write_tmp(dest, lambda fh: fh.write(data))
        try:
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _put_file(self, key: str, path: Path) -> None:
        dest = self._path(key)

        def copy(fh: Any) -> None:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, fh, 1 << 20)

        tmp = self._write_tmp(dest, copy)
        try:
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _put_if_absent(self, key: str, data: bytes) -> bool:
        dest = self._path(key)
        tmp = self._write_tmp(dest, lambda fh: fh.write(data))
        try:
            os.link(tmp, dest)  # atomic, fails if dest exists
            return True
        except FileExistsError:
            return False
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"not found in store: {key}")

    def _iter(self, key: str, chunk_size: int) -> Iterator[bytes]:
        try:
            fh = open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"not found in store: {key}")
        with fh:
            while chunk := fh.read(chunk_size):
                yield chunk

    def _list(self, prefix: str) -> list[str]:
        base = self.root / prefix if prefix else self.root
        start = base if base.is_dir() else base.parent
        if not start.exists():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(start):
            for name in files:
                if name.startswith(_TMP_MARK):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), self.root).replace(os.sep, "/")
                if rel.startswith(prefix):
                    out.append(rel)
        return out

    def _stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"not found in store: {key}")
        if not path.is_file():
            raise NotFound(f"not found in store: {key}")
        return ObjectInfo(
            key=key, size=st.st_size, modified=st.st_mtime, etag=f"{st.st_mtime_ns:x}-{st.st_size:x}"
        )

    def _copy(self, src: str, dst: str) -> None:
        source = self._path(src)
        if not source.is_file():
            raise NotFound(f"not found in store: {src}")
        try:
            self._put_file(dst, source)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):  # removed meanwhile
            raise NotFound(f"not found in store: {src}")

    def _delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        # prune empty folders up to the root so listings stay clean
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def _is_transient(self, exc: BaseException) -> bool:
        return False  # a local disk is either there or broken: fail fast with a clear message

    def _translate(self, what: str, exc: BaseException) -> StoreError:
        if isinstance(exc, OSError):
            reason = {
                errno.ENOSPC: "no space left on device",
                errno.EDQUOT: "disk quota exceeded",
                errno.EACCES: "permission denied",
                errno.EPERM: "permission denied",
                errno.EROFS: "read-only file system",
            }.get(exc.errno or 0, exc.strerror or str(exc))
            return StoreError(f"local store {self.root}: cannot {what}: {reason}")
        return super()._translate(what, exc)


class S3Store(Store):
    """An S3 bucket (MinIO, AWS, moto …) through the ``minio`` client."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        endpoint: str,
        access_key: str | None,
        secret_key: str | None,
        secure: bool = False,
        region: str | None = None,
        ca_file: str | None = None,
        retry_seconds: float = 30.0,
        create_bucket: bool = True,
    ) -> None:
        import certifi  # noqa: F401  (minio's default CA bundle)
        import urllib3
        from minio import Minio

        super().__init__(retry_seconds)
        parsed = urllib.parse.urlparse(endpoint if "://" in endpoint else f"//{endpoint}")
        if parsed.scheme in ("http", "https"):
            secure = parsed.scheme == "https"
        host = parsed.netloc or parsed.path
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}"
        # Short connect/read timeouts and no urllib3-level retries: retries happen in
        # Store._retry (novelcrafter.retry.STORE_BACKOFF) with a deadline, so an outage is bounded and logged.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(
                connect=3.0, read=15.0
            ),  # per socket read: a silent network fails fast and is retried
            retries=False,
            maxsize=16,
            cert_reqs="CERT_REQUIRED" if secure else "CERT_NONE",
            ca_certs=ca_file or (__import__("certifi").where() if secure else None),
        )
        self.client = Minio(
            host, access_key=access_key, secret_key=secret_key, secure=secure, region=region, http_client=http
        )
        if create_bucket:
            self._retry(f"open bucket {bucket}", self._ensure_bucket)

    def _ensure_bucket(self) -> None:
        from minio.error import S3Error

        if not self.client.bucket_exists(self.bucket):
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as exc:
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def _k(self, key: str) -> str:
        return self.prefix + key

    def _put(self, key: str, data: bytes) -> None:
        self.client.put_object(self.bucket, self._k(key), io.BytesIO(data), len(data))

    def _put_file(self, key: str, path: Path) -> None:
        self.client.fput_object(self.bucket, self._k(key), str(path))

    def _put_if_absent(self, key: str, data: bytes) -> bool:
        from minio.error import S3Error

        try:
            # S3 conditional write: 412 when the key exists (AWS, MinIO, moto). The public
            # put_object() cannot send If-None-Match, so use the single-PUT primitive directly.
            self.client._put_object(
                self.bucket,
                self._k(key),
                data,
                headers={"If-None-Match": "*", "Content-Type": "application/octet-stream"},
            )
            return True
        except S3Error as exc:
            if exc.code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise

    def _get(self, key: str) -> bytes:
        resp = self._open(key)
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    def _open(self, key: str) -> Any:
        from minio.error import S3Error

        try:
            return self.client.get_object(self.bucket, self._k(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                raise NotFound(f"not found in store: {key}")
            raise

    def _iter(self, key: str, chunk_size: int) -> Iterator[bytes]:
        resp = self._open(key)
        try:
            yield from resp.stream(chunk_size)
        finally:
            resp.close()
            resp.release_conn()

    def _list(self, prefix: str) -> list[str]:
        n = len(self.prefix)
        return [
            obj.object_name[n:]
            for obj in self.client.list_objects(self.bucket, prefix=self._k(prefix), recursive=True)
            if not obj.is_dir
        ]

    def _stat(self, key: str) -> ObjectInfo:
        from minio.error import S3Error

        try:
            st = self.client.stat_object(self.bucket, self._k(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound"):
                raise NotFound(f"not found in store: {key}")
            raise
        modified = st.last_modified.timestamp() if st.last_modified else 0.0
        return ObjectInfo(key=key, size=st.size or 0, modified=modified, etag=st.etag or "")

    def _copy(self, src: str, dst: str) -> None:
        from minio.commonconfig import CopySource
        from minio.error import S3Error

        try:
            self.client.copy_object(self.bucket, self._k(dst), CopySource(self.bucket, self._k(src)))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound"):
                raise NotFound(f"not found in store: {src}")
            raise

    def _delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, self._k(key))

    def _is_transient(self, exc: BaseException) -> bool:
        import urllib3
        from minio.error import S3Error, ServerError

        if isinstance(exc, ServerError):
            return True
        if isinstance(exc, S3Error):
            return exc.code in ("SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout")
        return isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, OSError))


def open_store(url: str | None = None, settings: Any = None, *, retry_seconds: float | None = None) -> Store:
    """Open the store named by ``url`` (or the settings' ``store``)."""
    from novelcrafter.config import get_settings

    settings = settings or get_settings()
    url = url or settings.store
    retry = retry_seconds if retry_seconds is not None else settings.store_retry_seconds
    if url.startswith("s3://"):
        rest = url[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", bucket):
            raise InvalidArgument(f"invalid S3 bucket name in store URL {url!r}")
        if not settings.s3_endpoint:
            raise InvalidArgument(
                f"store {url} needs an S3 endpoint: set NOVELCRAFTER_S3_ENDPOINT (e.g. minio:9000)"
            )
        return S3Store(
            bucket,
            prefix,
            endpoint=settings.s3_endpoint,
            access_key=settings.aws_access_key_id,
            secret_key=settings.aws_secret_access_key,
            secure=settings.s3_secure,
            region=settings.s3_region,
            ca_file=settings.s3_ca_file,
            retry_seconds=retry,
        )
    if url.startswith("file://"):
        url = urllib.parse.urlparse(url).path
    elif "://" in url:
        raise InvalidArgument(f"unsupported store URL {url!r}: use a path, file://PATH or s3://BUCKET/PREFIX")
    return LocalStore(url, retry_seconds=retry)
