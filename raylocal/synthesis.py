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
    key = np.random.SeedSequence([seed, SPLITS.index(split), epoch]).generate_state(1, np.uint64)[0]
    counters = np.asarray(digits, dtype=np.uint64) * np.uint64(2) ^ key
    xs = _splitmix64(counters) % np.uint64(POSITIONS)
    ys = _splitmix64(counters + np.uint64(1)) % np.uint64(POSITIONS)
    return xs.astype(np.int64), ys.astype(np.int64)


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
) -> dict[str, np.ndarray]:
    """Rows [start, stop) of one epoch of one split, as columns. Row r is digit order[r] of the
    split, placed by `placement`; any slice regenerates alone, byte for byte."""
    split_indices = plan.indices(split)
    order = epoch_order(seed, split, epoch, len(split_indices))
    chosen = split_indices[order[start:stop]]
    canvases, boxes = place(images[chosen], *placement(seed, split, epoch, chosen), tight_boxes)
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
) -> dict[str, np.ndarray]:
    """Shard `shard` of `synthesize_split`: the unit of work of a data worker."""
    return synthesize_split(images, labels, plan, seed=seed, split=split, epoch=epoch, start=shard * shard_size,
                            stop=(shard + 1) * shard_size, tight_boxes=tight_boxes)


def num_shards(plan: SplitPlan, split: str, shard_size: int) -> int:
    return -(-len(plan.indices(split)) // shard_size)
