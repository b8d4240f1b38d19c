"""Synthesis stage: paste 28x28 digits at random positions on black 75x75 canvases.

Pure numpy and vectorized. Where a digit lands depends only on (seed, split, epoch, digit
index), never on which shard, batch or `--limit` builds it: the search, `raylocal.evaluate`,
the benchmarks and the tests all get the same canvas for the same digit of the same epoch.
`synthesize_split` is the one builder of split rows; shards are slices of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CANVAS = 75
DIGIT = 28
POSITIONS = CANVAS - DIGIT + 1
SPLITS = ("train", "val", "test")
# `augment`: each training digit is turned by up to this many degrees either way and scaled by up
# to this fraction about its frame's centre before it is pasted; validation and test digits never.
AUGMENT_DEGREES = 10.0
AUGMENT_SCALE = 0.1


@dataclass(frozen=True)
class SplitPlan:
    """Which source digits make up each split; validation is the tail of MNIST train."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def indices(self, split: str) -> np.ndarray:
        return getattr(self, split)


def split_plan(num_train_digits: int, num_test_digits: int, val_fraction: float = 1 / 12) -> SplitPlan:
    # 1/12 of MNIST's 60k training digits is the customary 5k validation split.
    num_val = max(1, round(num_train_digits * val_fraction))
    if num_val >= num_train_digits:
        raise ValueError(f"{num_train_digits} training digits leave none for training after validation")
    return SplitPlan(
        train=np.arange(num_train_digits - num_val),
        val=np.arange(num_train_digits - num_val, num_train_digits),
        test=np.arange(num_test_digits),
    )


def _splitmix64(values: np.ndarray) -> np.ndarray:
    # A well-mixed 64-bit hash (Steele et al.'s SplitMix64 finalizer); uint64 arithmetic wraps.
    z = values + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def placement(seed: int, split: str, epoch: int, digits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of each digit's top-left corner, uniform over the POSITIONS: a hash of (seed, split,
    epoch, digit index), so each digit's place is independent of every other digit's."""
    first, second = digit_hashes([seed, SPLITS.index(split), epoch], digits)
    return (first % np.uint64(POSITIONS)).astype(np.int64), (second % np.uint64(POSITIONS)).astype(np.int64)


def digit_hashes(key: list[int], digits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two independent 64-bit hashes per digit index under `key`: a digit's draws never depend on
    which other digits are drawn with it."""
    mixed = np.random.SeedSequence(key).generate_state(1, np.uint64)[0]
    counters = np.asarray(digits, dtype=np.uint64) * np.uint64(2) ^ mixed
    return _splitmix64(counters), _splitmix64(counters + np.uint64(1))


def _unit(hashes: np.ndarray) -> np.ndarray:
    """Uniform floats in [-1, 1) from 64-bit hashes (their top 53 bits)."""
    return (hashes >> np.uint64(11)).astype(np.float64) * 2.0**-52 - 1.0


def distortion(seed: int, epoch: int, digits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(angle in degrees, scale) of each training digit: like `placement`, a hash of (seed, epoch,
    digit index), under a key of its own so that it is independent of where the digit lands."""
    first, second = digit_hashes([seed, SPLITS.index("train"), epoch, 1], digits)
    return AUGMENT_DEGREES * _unit(first), 1.0 + AUGMENT_SCALE * _unit(second)


def distort(digits: np.ndarray, angles: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Digits [N,28,28] uint8 turned by `angles` (degrees, counter-clockwise as displayed) and scaled
    by `scales` about the frame's centre; bilinear, ink moved outside the frame is cut off."""
    check_digits(digits)
    count, side = len(digits), DIGIT + 2
    theta = np.radians(np.asarray(angles, dtype=np.float64))[:, None]
    inverse = 1.0 / np.asarray(scales, dtype=np.float64)[:, None]
    cos, sin = (np.cos(theta) * inverse).astype(np.float32), (np.sin(theta) * inverse).astype(np.float32)
    centre = np.float32((DIGIT - 1) / 2)
    rows, cols = np.meshgrid(np.arange(DIGIT, dtype=np.float32) - centre, np.arange(DIGIT, dtype=np.float32) - centre,
                             indexing="ij")
    dx, dy = cols.reshape(1, -1), rows.reshape(1, -1)
    # Each output pixel reads the source point the inverse transform maps it to (rows grow downwards).
    src_x = cos * dx - sin * dy + centre
    src_y = sin * dx + cos * dy + centre
    inside = (src_x > -1) & (src_x < DIGIT) & (src_y > -1) & (src_y < DIGIT)
    x0, y0 = np.floor(src_x), np.floor(src_y)
    fx, fy = src_x - x0, src_y - y0
    # In a frame with a black border of one pixel, the four pixels around every point inside are in range.
    corner = (np.clip(y0, -1, DIGIT - 1).astype(np.int32) + 1) * side + np.clip(x0, -1, DIGIT - 1).astype(np.int32) + 1
    padded = np.pad(digits, ((0, 0), (1, 1), (1, 1))).reshape(count, -1)

    def read(offset: int) -> np.ndarray:
        return np.take_along_axis(padded, corner + offset, axis=1).astype(np.float32)

    top_left, top_right = read(0), read(1)
    top = top_left + (top_right - top_left) * fx
    bottom_left, bottom_right = read(side), read(side + 1)
    bottom = bottom_left + (bottom_right - bottom_left) * fx
    values = (top + (bottom - top) * fy) * inside
    return np.clip(np.rint(values), 0, 255).astype(np.uint8).reshape(count, DIGIT, DIGIT)


def epoch_order(seed: int, split: str, epoch: int, num: int) -> np.ndarray:
    """Training digits are shuffled anew each epoch; validation and test keep their order."""
    if split != "train":
        return np.arange(num)
    return np.random.default_rng([seed, SPLITS.index(split), epoch]).permutation(num)


def paste(digits: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Canvases [N,75,75] uint8 with digit i's top-left corner at (xs[i], ys[i])."""
    count = len(digits)
    canvases = np.zeros((count, CANVAS, CANVAS), dtype=np.uint8)
    # A writable view indexed by (image, top, left) whose elements are 28x28 windows of
    # the canvases: one fancy-index assignment pastes every digit, no Python loop.
    item = canvases.itemsize
    windows = np.lib.stride_tricks.as_strided(
        canvases,
        shape=(count, POSITIONS, POSITIONS, DIGIT, DIGIT),
        strides=(CANVAS * CANVAS * item, CANVAS * item, item, CANVAS * item, item),
    )
    windows[np.arange(count), ys, xs] = digits
    return canvases


def ink_extent(digits: np.ndarray) -> np.ndarray:
    """Per digit (first col, first row, last col + 1, last row + 1) holding ink; blank digits get the full frame."""
    cols = digits.any(axis=1)
    rows = digits.any(axis=2)
    blank = ~cols.any(axis=1)
    first_col = np.where(blank, 0, cols.argmax(axis=1))
    first_row = np.where(blank, 0, rows.argmax(axis=1))
    end_col = np.where(blank, DIGIT, DIGIT - cols[:, ::-1].argmax(axis=1))
    end_row = np.where(blank, DIGIT, DIGIT - rows[:, ::-1].argmax(axis=1))
    return np.stack([first_col, first_row, end_col, end_row], axis=1)


def check_digits(digits: np.ndarray) -> None:
    if digits.ndim != 3 or digits.shape[1:] != (DIGIT, DIGIT) or digits.dtype != np.uint8:
        raise ValueError(f"digits must be uint8 [N,{DIGIT},{DIGIT}], got {digits.dtype} {digits.shape}")


def place(digits: np.ndarray, xs: np.ndarray, ys: np.ndarray, tight_boxes: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Canvases uint8 [N,75,75] with digit i at (xs[i], ys[i]), and boxes float32 [N,4].

    Boxes are normalized (xmin, ymin, xmax, ymax): the pasted 28x28 frame, as in the
    reference notebook, or with ``tight_boxes`` the tight box around the ink.
    """
    check_digits(digits)
    extent = ink_extent(digits) if tight_boxes else np.array([[0, 0, DIGIT, DIGIT]])
    corners = np.stack([xs, ys, xs, ys], axis=1) + extent
    return paste(digits, xs, ys), (corners / CANVAS).astype(np.float32)


def synthesize(digits: np.ndarray, rng: np.random.Generator, tight_boxes: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Place each digit uniformly at random from `rng` (for images outside the splits); see `place`."""
    check_digits(digits)
    xs = rng.integers(0, POSITIONS, len(digits))
    ys = rng.integers(0, POSITIONS, len(digits))
    return place(digits, xs, ys, tight_boxes)


def synthesize_split(
    images: np.ndarray,
    labels: np.ndarray,
    plan: SplitPlan,
    *,
    seed: int,
    split: str,
    epoch: int,
    start: int = 0,
    stop: int | None = None,
    tight_boxes: bool = False,
    augment: bool = False,
) -> dict[str, np.ndarray]:
    """Rows [start, stop) of one epoch of one split, as columns. Row r is digit order[r] of the
    split, placed by `placement` (a training digit first distorted by `distortion` if `augment`);
    any slice regenerates alone, byte for byte."""
    split_indices = plan.indices(split)
    order = epoch_order(seed, split, epoch, len(split_indices))
    chosen = split_indices[order[start:stop]]
    digits = images[chosen]
    if augment and split == "train":
        digits = distort(digits, *distortion(seed, epoch, chosen))
    canvases, boxes = place(digits, *placement(seed, split, epoch, chosen), tight_boxes)
    return {"image": canvases, "box": boxes, "label": labels[chosen].astype(np.int64), "digit_index": chosen}


def synthesize_shard(
    images: np.ndarray,
    labels: np.ndarray,
    plan: SplitPlan,
    *,
    seed: int,
    split: str,
    epoch: int,
    shard: int,
    shard_size: int,
    tight_boxes: bool = False,
    augment: bool = False,
) -> dict[str, np.ndarray]:
    """Shard `shard` of `synthesize_split`: the unit of work of a data worker."""
    return synthesize_split(images, labels, plan, seed=seed, split=split, epoch=epoch, start=shard * shard_size,
                            stop=(shard + 1) * shard_size, tight_boxes=tight_boxes, augment=augment)


def num_shards(plan: SplitPlan, split: str, shard_size: int) -> int:
    return -(-len(plan.indices(split)) // shard_size)
