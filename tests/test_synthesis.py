from __future__ import annotations

import numpy as np
import pytest

from raylocal.synthesis import (
    AUGMENT_DEGREES,
    AUGMENT_SCALE,
    CANVAS,
    DIGIT,
    POSITIONS,
    SplitPlan,
    distort,
    distortion,
    ink_extent,
    num_shards,
    paste,
    placement,
    split_plan,
    synthesize,
    synthesize_shard,
    synthesize_split,
)

SEED = 7


def fake_digits(count: int, seed: int = 0) -> np.ndarray:
    """Random uint8 strokes inside a random sub-rectangle of each 28x28 frame, never blank."""
    rng = np.random.default_rng(seed)
    digits = np.zeros((count, DIGIT, DIGIT), dtype=np.uint8)
    for digit in digits:
        top, left = rng.integers(0, DIGIT - 4, 2)
        bottom, right = top + rng.integers(4, DIGIT - top + 1), left + rng.integers(4, DIGIT - left + 1)
        patch = rng.integers(1, 256, (bottom - top, right - left)) * (rng.random((bottom - top, right - left)) < 0.5)
        patch[0, 0] = patch[-1, -1] = 255
        digit[top:bottom, left:right] = patch
    return digits


def pixel_boxes(boxes: np.ndarray) -> np.ndarray:
    corners = boxes.astype(np.float64) * CANVAS
    np.testing.assert_allclose(corners, np.rint(corners), atol=1e-4)
    return np.rint(corners).astype(int)


@pytest.fixture(scope="module")
def source() -> tuple[np.ndarray, np.ndarray, SplitPlan]:
    images = fake_digits(240)
    labels = np.arange(240, dtype=np.uint8) % 10
    return images, labels, split_plan(180, 60)


def shard(source, split: str, epoch: int, index: int = 0, shard_size: int = 50, seed: int = SEED,
          augment: bool = False, tight_boxes: bool = False) -> dict:
    images, labels, plan = source
    return synthesize_shard(
        images, labels, plan, seed=seed, split=split, epoch=epoch, shard=index, shard_size=shard_size,
        augment=augment, tight_boxes=tight_boxes,
    )


@pytest.mark.parametrize("tight_boxes", [False, True])
def test_synthesize_shapes_and_dtypes(tight_boxes):
    canvases, boxes = synthesize(fake_digits(5), np.random.default_rng(0), tight_boxes)
    assert canvases.shape == (5, CANVAS, CANVAS) and canvases.dtype == np.uint8
    assert boxes.shape == (5, 4) and boxes.dtype == np.float32


@pytest.mark.parametrize("tight_boxes", [False, True])
def test_boxes_are_normalized_and_well_formed(tight_boxes):
    _, boxes = synthesize(fake_digits(64), np.random.default_rng(1), tight_boxes)
    assert boxes.min() >= 0.0 and boxes.max() <= 1.0
    assert np.all(boxes[:, 0] < boxes[:, 2]) and np.all(boxes[:, 1] < boxes[:, 3])


def test_frame_box_is_exactly_one_digit_wide():
    _, boxes = synthesize(fake_digits(64), np.random.default_rng(2))
    np.testing.assert_allclose(boxes[:, 2] - boxes[:, 0], DIGIT / CANVAS, atol=1e-6)
    np.testing.assert_allclose(boxes[:, 3] - boxes[:, 1], DIGIT / CANVAS, atol=1e-6)
    corners = pixel_boxes(boxes)
    assert np.all(corners[:, 2:] - corners[:, :2] == DIGIT)


@pytest.mark.parametrize("tight_boxes", [False, True])
def test_all_ink_lies_inside_the_box(tight_boxes):
    canvases, boxes = synthesize(fake_digits(32), np.random.default_rng(3), tight_boxes)
    for canvas, (x0, y0, x1, y1) in zip(canvases, pixel_boxes(boxes)):
        outside = canvas.copy()
        outside[y0:y1, x0:x1] = 0
        assert not outside.any()


def test_tight_box_hugs_the_ink_inside_the_frame_box():
    digits = fake_digits(32)
    canvases, frames = synthesize(digits, np.random.default_rng(4))
    _, tights = synthesize(digits, np.random.default_rng(4), tight_boxes=True)
    frame, tight = pixel_boxes(frames), pixel_boxes(tights)
    assert np.all(tight[:, :2] >= frame[:, :2]) and np.all(tight[:, 2:] <= frame[:, 2:])
    for canvas, (x0, y0, x1, y1) in zip(canvases, tight):
        crop = canvas[y0:y1, x0:x1]
        assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any()


def test_canvas_cropped_at_the_frame_box_is_the_digit():
    digits = fake_digits(32)
    canvases, boxes = synthesize(digits, np.random.default_rng(5))
    for canvas, digit, (x0, y0, x1, y1) in zip(canvases, digits, pixel_boxes(boxes)):
        np.testing.assert_array_equal(canvas[y0:y1, x0:x1], digit)


def test_same_seed_gives_identical_bytes():
    digits = fake_digits(16)
    first = synthesize(digits, np.random.default_rng(11), tight_boxes=True)
    second = synthesize(digits, np.random.default_rng(11), tight_boxes=True)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(first, second))


def test_train_reshuffles_and_replaces_digits_every_epoch(source):
    first, second = shard(source, "train", epoch=0), shard(source, "train", epoch=1)
    assert not np.array_equal(first["digit_index"], second["digit_index"])
    assert not np.array_equal(first["box"], second["box"])


@pytest.mark.parametrize("split", ["val", "test"])
def test_evaluation_splits_keep_digit_order_but_move_digits_every_epoch(source, split):
    first, second = shard(source, split, epoch=0), shard(source, split, epoch=1)
    _, _, plan = source
    np.testing.assert_array_equal(first["digit_index"], plan.indices(split)[:50])
    np.testing.assert_array_equal(first["digit_index"], second["digit_index"])
    assert not np.array_equal(first["box"], second["box"])


def test_shard_columns_match_their_source_digits(source):
    images, labels, _ = source
    columns = shard(source, "train", epoch=3, index=1)
    assert set(columns) == {"image", "box", "label", "digit_index"}
    assert columns["label"].dtype == np.int64
    np.testing.assert_array_equal(columns["label"], labels[columns["digit_index"]])
    for canvas, index, (x0, y0, x1, y1) in zip(columns["image"], columns["digit_index"], pixel_boxes(columns["box"])):
        np.testing.assert_array_equal(canvas[y0:y1, x0:x1], images[index])


@pytest.mark.parametrize(
    "changed",
    [
        {"seed": SEED + 1},
        {"split": "val"},
        {"split": "test"},
        {"epoch": 1},
    ],
    ids=lambda changed: next(iter(changed)) + "=" + str(next(iter(changed.values()))),
)
def test_placement_depends_on_every_coordinate(changed):
    base = {"seed": SEED, "split": "train", "epoch": 0, "digits": np.arange(8)}
    xs, ys = placement(**base)
    moved = placement(**(base | changed))
    assert not (np.array_equal(xs, moved[0]) and np.array_equal(ys, moved[1]))
    again = placement(**base)
    np.testing.assert_array_equal(xs, again[0])
    np.testing.assert_array_equal(ys, again[1])


def test_a_digit_lands_in_the_same_place_whatever_else_is_placed():
    xs, ys = placement(SEED, "train", 3, np.arange(1000))
    some = np.array([999, 5, 17])
    alone = placement(SEED, "train", 3, some)
    np.testing.assert_array_equal(alone[0], xs[some])
    np.testing.assert_array_equal(alone[1], ys[some])


def test_placement_is_uniform_over_every_position_and_x_and_y_independent():
    xs, ys = placement(SEED, "train", 0, np.arange(48 * 48 * 20))
    for axis in (xs, ys):
        counts = np.bincount(axis, minlength=POSITIONS)
        assert len(counts) == POSITIONS and counts.min() > 0.7 * counts.mean() and counts.max() < 1.3 * counts.mean()
    assert abs(np.corrcoef(xs, ys)[0, 1]) < 0.02


@pytest.mark.parametrize("split", ["train", "val", "test"])
@pytest.mark.parametrize("shard_size", [1, 7, 50, 1000])
def test_the_first_canvases_are_the_same_for_any_shard_size(source, split, shard_size):
    images, labels, plan = source
    whole = synthesize_split(images, labels, plan, seed=SEED, split=split, epoch=1)
    count = num_shards(plan, split, shard_size)
    shards = [synthesize_shard(images, labels, plan, seed=SEED, split=split, epoch=1, shard=i, shard_size=shard_size)
              for i in range(count)]
    for key in whole:
        assert np.concatenate([part[key] for part in shards]).tobytes() == whole[key].tobytes()


def test_a_limited_test_split_is_the_start_of_the_full_one(source):
    """`raylocal.evaluate --limit N` builds a test split of N digits: its canvases are the search's first N."""
    images, labels, plan = source
    full = synthesize_split(images, labels, plan, seed=SEED, split="test", epoch=0)
    limited_plan = split_plan(180, 13)
    limited = synthesize_split(images, labels, limited_plan, seed=SEED, split="test", epoch=0)
    for key in full:
        assert limited[key].tobytes() == full[key][:13].tobytes()


def test_positions_are_uniform_integers_reaching_both_edges():
    blank = np.zeros((3000, DIGIT, DIGIT), dtype=np.uint8)
    _, boxes = synthesize(blank, np.random.default_rng(6))
    corners = pixel_boxes(boxes)
    for axis in (0, 1):
        counts = np.bincount(corners[:, axis], minlength=POSITIONS)
        assert len(counts) == POSITIONS
        assert counts[0] > 0 and counts[POSITIONS - 1] > 0
        assert counts.min() > 0.4 * counts.mean() and counts.max() < 1.6 * counts.mean()


def test_paste_matches_a_naive_loop():
    rng = np.random.default_rng(8)
    digits = rng.integers(0, 256, (20, DIGIT, DIGIT), dtype=np.uint8)
    xs, ys = rng.integers(0, POSITIONS, 20), rng.integers(0, POSITIONS, 20)
    xs[:2], ys[:2] = [0, POSITIONS - 1], [POSITIONS - 1, 0]
    expected = np.zeros((20, CANVAS, CANVAS), dtype=np.uint8)
    for canvas, digit, x, y in zip(expected, digits, xs, ys):
        canvas[y : y + DIGIT, x : x + DIGIT] = digit
    np.testing.assert_array_equal(paste(digits, xs, ys), expected)


def test_ink_extent_of_a_hand_made_digit():
    digit = np.zeros((DIGIT, DIGIT), dtype=np.uint8)
    digit[5, 9] = 1
    digit[20, 3] = 200
    digit[12, 17] = 9
    np.testing.assert_array_equal(ink_extent(digit[None]), [[3, 5, 18, 21]])


def test_ink_extent_touching_every_border_is_the_full_frame():
    digit = np.zeros((DIGIT, DIGIT), dtype=np.uint8)
    digit[0, 0] = digit[DIGIT - 1, DIGIT - 1] = 1
    np.testing.assert_array_equal(ink_extent(digit[None]), [[0, 0, DIGIT, DIGIT]])


def test_ink_extent_of_a_blank_digit_is_the_full_frame():
    digits = np.zeros((2, DIGIT, DIGIT), dtype=np.uint8)
    digits[1, 4:6, 7:9] = 50
    np.testing.assert_array_equal(ink_extent(digits), [[0, 0, DIGIT, DIGIT], [7, 4, 9, 6]])


def test_split_plan_of_full_mnist():
    plan = split_plan(60000, 10000)
    assert (len(plan.train), len(plan.val), len(plan.test)) == (55000, 5000, 10000)
    assert np.intersect1d(plan.train, plan.val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([plan.train, plan.val])), np.arange(60000))
    np.testing.assert_array_equal(plan.test, np.arange(10000))
    assert plan.indices("val") is plan.val


def test_split_plan_needs_digits_left_for_training():
    with pytest.raises(ValueError, match="training"):
        split_plan(1, 10)


@pytest.mark.parametrize(
    "digits",
    [
        np.zeros((2, DIGIT, DIGIT), dtype=np.float32),
        np.zeros((2, DIGIT, DIGIT), dtype=np.int64),
        np.zeros((2, DIGIT, DIGIT + 1), dtype=np.uint8),
        np.zeros((DIGIT, DIGIT), dtype=np.uint8),
        np.zeros((2, 1, DIGIT, DIGIT), dtype=np.uint8),
    ],
    ids=["float32", "int64", "28x29", "unbatched", "channel-dim"],
)
def test_synthesize_rejects_wrong_shapes_and_dtypes(digits):
    with pytest.raises(ValueError, match="uint8"):
        synthesize(digits, np.random.default_rng(0))


@pytest.mark.parametrize(
    ("size", "shard_size", "expected"), [(100, 50, 2), (101, 50, 3), (49, 50, 1), (1, 1, 1), (5000, 1, 5000)]
)
def test_num_shards_rounds_up(size, shard_size, expected):
    plan = SplitPlan(train=np.arange(size), val=np.arange(1), test=np.arange(1))
    assert num_shards(plan, "train", shard_size) == expected


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_any_shard_regenerates_alone_as_its_slice_of_the_epoch(source, split):
    _, _, plan = source
    count = num_shards(plan, split, 40)
    shards = [shard(source, split, epoch=2, index=i, shard_size=40) for i in range(count)]
    epoch = {key: np.concatenate([s[key] for s in shards]) for key in shards[0]}
    np.testing.assert_array_equal(np.sort(epoch["digit_index"]), plan.indices(split))
    for index in (1, count - 1):
        alone = shard(source, split, epoch=2, index=index, shard_size=40)
        for key, column in alone.items():
            assert column.tobytes() == epoch[key][index * 40 : (index + 1) * 40].tobytes()


def test_distort_without_a_turn_or_scale_is_the_identity():
    digits = fake_digits(20)
    np.testing.assert_array_equal(distort(digits, np.zeros(20), np.ones(20)), digits)


def test_distort_turns_counter_clockwise_as_displayed():
    digits = fake_digits(6, seed=1)
    np.testing.assert_array_equal(distort(digits, np.full(6, 90.0), np.ones(6)), np.rot90(digits, 1, axes=(1, 2)))
    np.testing.assert_array_equal(distort(digits, np.full(6, -90.0), np.ones(6)), np.rot90(digits, 3, axes=(1, 2)))


def test_distort_scales_about_the_centre_and_cuts_off_what_leaves_the_frame():
    square = np.zeros((1, DIGIT, DIGIT), dtype=np.uint8)
    square[0, 10:18, 10:18] = 200  # 8x8 about the centre (13.5, 13.5)
    grown = distort(square, np.zeros(1), np.full(1, 2.0))[0]
    rows, cols = np.nonzero(grown)
    # Offsets from the centre double: the 8 pixels and their bilinear fringe cover 5-22, full ink 7-20.
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (5, 22, 5, 22)
    assert grown[7:21, 7:21].min() == 200
    corner = np.zeros((1, DIGIT, DIGIT), dtype=np.uint8)
    corner[0, :3, :3] = 255
    assert not distort(corner, np.zeros(1), np.full(1, 4.0)).any()


def test_distortions_stay_in_range_and_depend_on_seed_epoch_and_digit():
    digits = np.arange(5000)
    angles, scales = distortion(SEED, 2, digits)
    assert np.abs(angles).max() <= AUGMENT_DEGREES and np.abs(scales - 1).max() <= AUGMENT_SCALE
    # Spread over the whole range, not stuck near 0.
    assert np.abs(angles).max() > 0.95 * AUGMENT_DEGREES and np.abs(scales - 1).max() > 0.95 * AUGMENT_SCALE
    assert abs(np.corrcoef(angles, scales)[0, 1]) < 0.05
    again = distortion(SEED, 2, digits[100:200])
    np.testing.assert_array_equal(again[0], angles[100:200])
    for other in (distortion(SEED + 1, 2, digits), distortion(SEED, 3, digits)):
        assert not np.allclose(other[0], angles)


def test_augment_distorts_training_digits_only(source):
    for split in ("val", "test"):
        plain, augmented = shard(source, split, epoch=1), shard(source, split, epoch=1, augment=True)
        for key in plain:
            np.testing.assert_array_equal(plain[key], augmented[key])
    plain, augmented = shard(source, "train", epoch=1), shard(source, "train", epoch=1, augment=True)
    for key in ("box", "label", "digit_index"):
        np.testing.assert_array_equal(plain[key], augmented[key])
    changed = [not np.array_equal(a, b) for a, b in zip(plain["image"], augmented["image"])]
    assert np.mean(changed) > 0.9


def test_an_augmented_training_shard_regenerates_alone_and_its_tight_box_holds_the_ink(source):
    whole = shard(source, "train", epoch=2, shard_size=100, augment=True, tight_boxes=True)
    alone = shard(source, "train", epoch=2, index=1, shard_size=50, augment=True, tight_boxes=True)
    for key, column in alone.items():
        assert column.tobytes() == whole[key][50:100].tobytes()
    for canvas, (x0, y0, x1, y1) in zip(whole["image"], pixel_boxes(whole["box"])):
        inside = canvas[y0:y1, x0:x1]
        assert inside.sum() == canvas.sum() > 0
