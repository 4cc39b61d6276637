"""One object-store interface, two backends: a local directory and S3 (MinIO SDK).

Keys are ``/``-separated relative paths (see :mod:`fedround.tasks.core.keys`). Writes are
atomic: a reader sees the old object or the whole new one, never a torn write.
"""

from __future__ import annotations

import io
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from fedround.tasks.core.errors import ConfigError, ObjectNotFound, ObjectStoreError, ObjectTooLarge
from fedround.tasks.core.quota import PrefixUsage, measure

_Headers = dict[str, str | list[str] | tuple[str]]  # what the MinIO SDK accepts as headers


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in {"", ".", ".."} for p in parts):
        raise ValueError(f"invalid object key {key!r}: use a relative path like 'a/b/c.json'")
    return key


def _within(data: bytes, max_bytes: int | None, uri: str) -> bytes:
    if max_bytes is not None and len(data) > max_bytes:
        raise ObjectTooLarge(f"{uri} is larger than the {max_bytes:,} bytes allowed for it")
    return data


class ObjectStore(ABC):
    """The operations fedround needs from an object store."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        """The object's bytes; raises :class:`ObjectNotFound` if absent.

        With ``max_bytes`` (objects another party wrote: a site's heartbeat, report or
        manifest), at most ``max_bytes + 1`` bytes are read, in the same request that
        opens the object, and a larger object raises :class:`ObjectTooLarge`: no size
        check that the writer could outrun by replacing the object, no unbounded read.
        """

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes; raises :class:`ObjectNotFound` if absent."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (recursive), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove a key; absent keys are fine."""

    @abstractmethod
    def usage(self, prefix: str, max_objects: int | None = None) -> PrefixUsage:
        """The bytes and count of the current objects under ``prefix`` (recursive). With
        ``max_objects``, counting stops after ``max_objects + 1`` objects (``complete``
        false): enough to tell that a quota is broken without listing a flood of them."""

    @abstractmethod
    def uri(self, key: str) -> str:
        """A human-readable location for logs and lineage."""

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    def trim_versions(self, key: str) -> int:
        """Delete the noncurrent versions of ``key`` a versioned bucket keeps, leaving the
        current one; returns how many went. A backend without versions has none (0)."""
        return 0

    # Conditional writes: the primitives behind locks and the append-only audit log. Both
    # are atomic across processes (and, on S3, across machines): of several concurrent
    # callers exactly one succeeds.

    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist; ``False`` if it already did."""
        raise NotImplementedError(f"{type(self).__name__} has no conditional writes")

    def replace(self, key: str, data: bytes, expected: bytes) -> bool:
        """Overwrite ``key`` only if it still holds ``expected`` (compare-and-swap)."""
        raise NotImplementedError(f"{type(self).__name__} has no conditional writes")


class LocalObjectStore(ObjectStore):
    """A directory tree; the embedded default."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        try:
            with self._path(key).open("rb") as handle:
                data = handle.read() if max_bytes is None else handle.read(max_bytes + 1)
        except FileNotFoundError:
            raise ObjectNotFound(f"no object {self.uri(key)}") from None
        return _within(data, max_bytes, self.uri(key))

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise ObjectNotFound(f"no object {self.uri(key)}") from None

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix if prefix else self.root
        start = base if base.is_dir() else base.parent
        if not start.exists():
            return []
        keys = []
        for path in start.rglob("*"):
            if path.is_file() and not path.name.startswith("."):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def usage(self, prefix: str, max_objects: int | None = None) -> PrefixUsage:
        return measure(self._file_sizes(prefix), max_objects)

    def _file_sizes(self, prefix: str) -> Iterator[int]:
        """The size of every file under ``prefix``, a write's temporary file too: it takes
        space like any other."""
        base = os.path.join(self.root, prefix) if prefix else str(self.root)
        if prefix.endswith("/") or not prefix:
            folders, wanted = [base.rstrip("/")], ""  # everything under it
        else:  # a partial name ('a/b' matches 'a/b/…' and 'a/bc'): filter the parent's entries
            folders, wanted = [os.path.dirname(base)], base
        while folders:
            try:
                entries = os.scandir(folders.pop())
            except (FileNotFoundError, NotADirectoryError):
                continue
            with entries:
                for entry in entries:
                    if wanted and not entry.path.startswith(wanted):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        try:
                            yield entry.stat(follow_symlinks=False).st_size
                        except FileNotFoundError:
                            continue  # deleted while listed

    def _temp_copy(self, path: Path, data: bytes) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return tmp

    def create(self, key: str, data: bytes) -> bool:
        # link(2) fails if the target exists, and the target appears complete or not at all.
        path = self._path(key)
        tmp = self._temp_copy(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True

    def replace(self, key: str, data: bytes, expected: bytes) -> bool:
        import fcntl

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.cas", "a+b") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)  # released when the file closes
            try:
                if path.read_bytes() != expected:
                    return False
            except FileNotFoundError:
                return False
            tmp = self._temp_copy(path, data)
            os.replace(tmp, path)
            return True

    def uri(self, key: str) -> str:
        return (self.root / key).as_uri()


class S3ObjectStore(ObjectStore):
    """An S3 bucket through the MinIO SDK (MinIO in production, any S3 server in tests)."""

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        secure: bool = False,
        region: str | None = None,
    ) -> None:
        from minio import Minio

        self.endpoint = endpoint
        self.bucket = bucket
        self.client = Minio(
            endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region
        )

    def _error(self, key: str, exc: Exception) -> ObjectStoreError:
        from minio.error import S3Error

        if isinstance(exc, S3Error) and exc.code in {"NoSuchKey", "NoSuchObject"}:
            return ObjectNotFound(f"no object {self.uri(key)}")
        if isinstance(exc, S3Error) and exc.code == "AccessDenied":
            return ObjectStoreError(
                f"access denied to {self.uri(key)}: this credential may not use that prefix"
            )
        return ObjectStoreError(f"object store error on {self.uri(key)}: {exc}")

    def put(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(self.bucket, _check_key(key), io.BytesIO(data), len(data))
        except Exception as exc:
            raise self._error(key, exc) from exc

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        try:
            response = self.client.get_object(self.bucket, _check_key(key))
        except Exception as exc:
            raise self._error(key, exc) from exc
        try:
            if max_bytes is None:
                return bytes(response.read())
            data = bytes(response.read(max_bytes + 1))  # the rest is never transferred
            return _within(data, max_bytes, self.uri(key))
        finally:
            response.close()
            response.release_conn()

    def size(self, key: str) -> int:
        try:
            stat = self.client.stat_object(self.bucket, _check_key(key))
        except Exception as exc:
            raise self._error(key, exc) from exc
        return int(stat.size or 0)

    def list(self, prefix: str) -> list[str]:
        try:
            found = self.client.list_objects(self.bucket, prefix=prefix, recursive=True)
            return sorted(str(obj.object_name) for obj in found if obj.object_name)
        except Exception as exc:
            raise self._error(prefix, exc) from exc

    def usage(self, prefix: str, max_objects: int | None = None) -> PrefixUsage:
        # One listing, whose entries carry the sizes: no request per object.
        try:
            listing = self.client.list_objects(self.bucket, prefix=prefix, recursive=True)
            return measure((int(obj.size or 0) for obj in listing if not obj.is_dir), max_objects)
        except Exception as exc:
            raise self._error(prefix, exc) from exc

    def delete(self, key: str) -> None:
        try:
            self.client.remove_object(self.bucket, _check_key(key))
        except Exception as exc:
            raise self._error(key, exc) from exc

    def trim_versions(self, key: str) -> int:
        from minio.deleteobjects import DeleteObject

        try:
            found = self.client.list_objects(
                self.bucket, prefix=_check_key(key), include_version=True
            )
            old = [
                DeleteObject(key, obj.version_id)
                for obj in found
                if obj.object_name == key
                and obj.version_id
                and str(obj.is_latest).lower() != "true"  # the SDK gives "true"/"false"
            ]
            for start in range(0, len(old), 1000):  # DeleteObjects takes up to 1,000 keys
                failed = list(self.client.remove_objects(self.bucket, old[start : start + 1000]))
                if failed:
                    raise ObjectStoreError(f"could not delete {len(failed)} versions: {failed[0]}")
        except ObjectStoreError:
            raise
        except Exception as exc:
            raise self._error(key, exc) from exc
        return len(old)

    def _conditional_put(self, key: str, data: bytes, condition: _Headers) -> bool:
        # S3 conditional writes (If-None-Match / If-Match). The MinIO SDK's public put_object
        # turns unknown headers into user metadata, so its plain PutObject call is used.
        from minio.error import S3Error

        try:
            self.client._put_object(self.bucket, _check_key(key), data, headers=condition)
        except S3Error as exc:
            if exc.code in {"PreconditionFailed", "ConditionalRequestConflict"}:
                return False
            raise self._error(key, exc) from exc
        except Exception as exc:
            raise self._error(key, exc) from exc
        return True

    def create(self, key: str, data: bytes) -> bool:
        return self._conditional_put(key, data, {"If-None-Match": "*"})

    def replace(self, key: str, data: bytes, expected: bytes) -> bool:
        try:
            response = self.client.get_object(self.bucket, _check_key(key))
        except Exception as exc:
            error = self._error(key, exc)
            if isinstance(error, ObjectNotFound):
                return False
            raise error from exc
        try:
            current, etag = bytes(response.read()), response.headers.get("ETag", "")
        finally:
            response.close()
            response.release_conn()
        if current != expected or not etag:
            return False
        return self._conditional_put(key, data, {"If-Match": etag})

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


class ObjectStoreSettings(BaseModel):
    """Where a party reads and writes objects. Secrets come from the environment by default."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "s3"] = "local"
    root: Path | None = Field(None, description="local: the directory")
    endpoint: str | None = Field(None, description="s3: host:port")
    bucket: str | None = None
    access_key: str | None = None
    secret_key: SecretStr | None = None
    secure: bool = False
    region: str | None = None


def open_store(settings: ObjectStoreSettings) -> ObjectStore:
    """Build the backend the settings describe; missing fields are a clear config error."""
    if settings.kind == "local":
        if settings.root is None:
            raise ConfigError("object_store.root is required when object_store.kind is 'local'")
        return LocalObjectStore(settings.root)
    access = settings.access_key or os.environ.get("FEDROUND_S3_ACCESS_KEY")
    secret = (
        settings.secret_key.get_secret_value()
        if settings.secret_key
        else os.environ.get("FEDROUND_S3_SECRET_KEY")
    )
    missing = [
        name
        for name, value in {
            "endpoint": settings.endpoint,
            "bucket": settings.bucket,
            "access_key (or FEDROUND_S3_ACCESS_KEY)": access,
            "secret_key (or FEDROUND_S3_SECRET_KEY)": secret,
        }.items()
        if not value
    ]
    if missing:
        raise ConfigError(f"object_store.kind is 's3' but these are missing: {', '.join(missing)}")
    assert settings.endpoint and settings.bucket  # checked just above
    assert access and secret
    return S3ObjectStore(
        settings.endpoint, settings.bucket, access, secret, settings.secure, settings.region
    )
