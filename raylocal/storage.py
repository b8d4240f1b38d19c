"""Where a search's files live: a local folder or object storage, through `pyarrow.fs`.

`pyarrow.fs` is the layer Ray Tune and Ray Train write trials and checkpoints through, so one
`Storage` serves both: Ray gets its filesystem and path, and raylocal reads and writes its own
files (the manifest, the export, the report) through the same object. S3-compatible stores
(MinIO, Ceph, R2) come through what pyarrow accepts: the URI's query
(`s3://bucket/path?endpoint_override=HOST:PORT&scheme=http`) and AWS's environment variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from raylocal.config import ConfigError


class StorageError(ConfigError):
    """Storage that cannot be reached, read or written: a user's setting, said in one line."""


@dataclass(frozen=True)
class Storage:
    """A folder: local, or on object storage. `uri` is what people see and what `child` extends;
    `fs` and `path` are what pyarrow (and Ray, as `storage_filesystem` and `storage_path`) use."""

    uri: str
    fs: Any  # a pyarrow.fs.FileSystem
    path: str

    @property
    def remote(self) -> bool:
        return "://" in self.uri

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def child(self, *parts: str) -> Storage:
        split = urlsplit(self.uri) if self.remote else None
        if split is None:
            return Storage(str(Path(self.uri, *parts)), self.fs, str(Path(self.path, *parts)))
        uri = urlunsplit(split._replace(path=posixpath.join(split.path or "/", *parts)))
        return Storage(uri, self.fs, posixpath.join(self.path, *parts))

    def parent(self) -> Storage:
        split = urlsplit(self.uri) if self.remote else None
        if split is None:
            return Storage(str(Path(self.uri).parent), self.fs, str(Path(self.path).parent))
        uri = urlunsplit(split._replace(path=posixpath.dirname(split.path.rstrip("/"))))
        return Storage(uri, self.fs, posixpath.dirname(self.path.rstrip("/")))

    @property
    def ray_filesystem(self):
        """What Ray's `storage_filesystem` takes: this filesystem for object storage, None for a
        local folder (Ray's default there)."""
        return self.fs if self.remote else None

    def local(self) -> Path | None:
        """The folder on this machine's disk, or None for object storage."""
        return None if self.remote else Path(self.path)

    def is_file(self, name: str) -> bool:
        from pyarrow import fs as pafs

        return self.fs.get_file_info(posixpath.join(self.path, name)).type == pafs.FileType.File

    def exists(self) -> bool:
        from pyarrow import fs as pafs

        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def read_text(self, name: str) -> str:
        with self.fs.open_input_stream(posixpath.join(self.path, name)) as stream:
            return stream.read().decode()

    def write_text(self, name: str, text: str) -> None:
        """Whole or not at all: a local file is written beside and renamed; an object appears when closed."""
        if not self.remote:
            Path(self.path).mkdir(parents=True, exist_ok=True)
            temporary = Path(self.path, f".{name}.{uuid.uuid4().hex}")
            temporary.write_text(text)
            temporary.replace(Path(self.path, name))
            return
        with self.fs.open_output_stream(posixpath.join(self.path, name)) as stream:
            stream.write(text.encode())

    def upload(self, folder: str | os.PathLike) -> None:
        """Copy a local folder's files into this one (which it replaces where names clash)."""
        from pyarrow import fs as pafs

        pafs.copy_files(os.fspath(folder), self.path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)

    def download(self, folder: str | os.PathLike) -> Path:
        """Copy this folder's files into a local folder; returns it."""
        from pyarrow import fs as pafs

        Path(folder).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path, os.fspath(folder), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return Path(folder)

    def move(self, source: str, destination: str) -> None:
        self.fs.move(posixpath.join(self.path, source), posixpath.join(self.path, destination))

    def folders(self, pattern_prefix: str = "") -> list[str]:
        """Names of the sub-folders, sorted."""
        from pyarrow import fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted(info.base_name for info in infos
                      if info.type == pafs.FileType.Directory and info.base_name.startswith(pattern_prefix))


def open_storage(where: str | os.PathLike) -> Storage:
    """A local folder (made absolute) or a URI pyarrow knows; an unknown scheme is a StorageError."""
    from pyarrow import fs as pafs

    text = os.fspath(where)
    if "://" not in text:
        folder = str(Path(text).expanduser().absolute())
        return Storage(folder, pafs.LocalFileSystem(), folder)
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except Exception as error:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError or ValueError here
        raise StorageError(f"storage {text}: {one_line(error)}") from None
    return Storage(text, fs, path.rstrip("/"))


def check_writable(storage: Storage) -> None:
    """Write and delete one small object, so that an unreachable endpoint, a missing bucket or
    wrong credentials stop the command before any work; nothing is left behind."""
    if not storage.remote:
        return
    probe = f".raylocal-probe-{uuid.uuid4().hex}"
    try:
        storage.write_text(probe, "raylocal checks it can write here\n")
        storage.fs.delete_file(posixpath.join(storage.path, probe))
    except Exception as error:  # noqa: BLE001 - pyarrow's S3 errors are OSErrors with AWS's text
        raise StorageError(f"cannot write to storage {storage.uri}: {one_line(error)}") from None


def one_line(error: BaseException) -> str:
    """pyarrow's S3 errors span lines, name the multipart upload they began and carry request ids:
    AWS's error code and its message say what is wrong."""
    text = " ".join(str(error).split())
    aws = re.search(r"AWS Error (\w+) during \w+ operation: ?(.*?)(?: \(Request ID.*)?$", text)
    if aws:
        code, message = aws.groups()
        if not message.strip() and code in ("INTERNAL_FAILURE", "ACCESS_DENIED"):
            message = "refused; are credentials set (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile)?"
        return f"{code}: {message.strip()}"
    return text.strip() or type(error).__name__


def cache_folder(storage: Storage) -> Path:
    """Where a remote folder is kept on this machine once downloaded: one folder per URI."""
    root = Path(os.environ.get("RAYLOCAL_CACHE", Path.home() / ".cache" / "raylocal")) / "storage"
    digest = hashlib.sha256(storage.uri.encode()).hexdigest()[:16]
    return root / f"{storage.name or 'root'}-{digest}"


def fetch(where: str | os.PathLike, refresh: bool = True) -> Path:
    """A folder to read on this machine: a local one as it is, a remote one downloaded into the
    cache (again when `refresh`, whole or not at all)."""
    storage = open_storage(where)
    if not storage.remote:
        return Path(storage.path)
    target = cache_folder(storage)
    if target.is_dir() and not refresh:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
    try:
        if not storage.exists():
            raise StorageError(f"nothing at {storage.uri}")
        storage.download(staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    except OSError as error:
        raise StorageError(f"cannot read {storage.uri}: {one_line(error)}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
