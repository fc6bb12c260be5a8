"""DETR transforms against naive implementations of the original DETR's rules (resize with a
capped longer side, crop, flip, normalise), written with Python floats."""

from __future__ import annotations

import random
from argparse import Namespace

import numpy as np
import pytest
import torch
import torchvision.transforms as transforms_v1
from PIL import Image, ImageDraw

from detr_irpe.config import complete_args
from detr_irpe.data.transforms import (
    DEFAULT_TRAIN_SCALES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalize,
    RandomHorizontalFlip,
    RandomSelect,
    RandomSizeCrop,
    ToTensor,
    crop,
    crop_branch_sizes,
    hflip,
    make_transforms,
    resize,
    resize_output_size,
)

# ----------------------------------------------------------------------------------------------
# Naive references of the original's rules, with Python floats.


def naive_output_size(w: int, h: int, s: int, max_size: int | None) -> tuple[int, int]:
    """(oh, ow): the longer side capped at max_size (half-even rounding of the shorter side),
    unchanged when the shorter side already equals s, else the longer side truncated."""
    if max_size is not None:
        ratio = max(w, h) / min(w, h)
        if ratio * s > max_size:
            s = round(max_size * min(w, h) / max(w, h))  # Python 3 round: half-even int
    if min(w, h) == s:
        return h, w
    if w < h:
        return int(s * h / w), s
    return s, int(s * w / h)


def naive_resize_boxes(boxes, w, h, ow, oh):
    return [[x0 * ow / w, y0 * oh / h, x1 * ow / w, y1 * oh / h] for x0, y0, x1, y1 in boxes]


def naive_crop(boxes, labels, top, left, height, width):
    """Shift, clip to the crop, area = clipped box area, drop empty boxes."""
    out_boxes, out_labels, out_area = [], [], []
    for (x0, y0, x1, y1), label in zip(boxes, labels, strict=True):
        cx0 = min(max(x0 - left, 0.0), width)
        cx1 = min(max(x1 - left, 0.0), width)
        cy0 = min(max(y0 - top, 0.0), height)
        cy1 = min(max(y1 - top, 0.0), height)
        if cx1 > cx0 and cy1 > cy0:
            out_boxes.append([cx0, cy0, cx1, cy1])
            out_labels.append(label)
            out_area.append((cx1 - cx0) * (cy1 - cy0))
    return out_boxes, out_labels, out_area


def naive_hflip(boxes, w):
    return [[w - x1, y0, w - x0, y1] for x0, y0, x1, y1 in boxes]


def make_target(boxes, w, h, labels=None) -> dict[str, torch.Tensor]:
    boxes_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    n = len(boxes_t)
    return {
        "boxes": boxes_t,
        "labels": torch.tensor(labels if labels is not None else list(range(1, n + 1))),
        "image_id": torch.tensor([7]),
        "area": (boxes_t[:, 2] - boxes_t[:, 0]) * (boxes_t[:, 3] - boxes_t[:, 1]),
        "iscrowd": torch.zeros(n, dtype=torch.int64),
        "orig_size": torch.tensor([h, w]),
        "size": torch.tensor([h, w]),
    }


def assert_close(actual: torch.Tensor, expected, atol: float = 1e-4) -> None:
    expected_t = torch.tensor(expected, dtype=torch.float64).reshape(actual.shape)
    torch.testing.assert_close(actual.double(), expected_t, rtol=1e-6, atol=atol)


# ----------------------------------------------------------------------------------------------
# Output size rule.


@pytest.mark.parametrize(
    ("w", "h", "s", "max_size", "expected"),
    [
        (640, 480, 800, 1333, (800, 1066)),  # 640*800/480 = 1066.67, truncated
        (480, 640, 800, 1333, (1066, 800)),
        (400, 100, 800, 1330, (332, 1328)),  # capped: round(332.5) = 332 (half-even)
        (500, 100, 800, 1500, (300, 1500)),  # capped: round(300.0) = 300
        (300, 800, 800, 1333, (1333, 500)),  # capped: round(499.875) = 500; int(1333.3) = 1333
        (800, 600, 600, 1333, (600, 800)),  # shorter side already 600: unchanged
        (64, 64, 80, None, (80, 80)),
    ],
)
def test_resize_output_size_worked_examples(w, h, s, max_size, expected):
    assert resize_output_size((w, h), s, max_size) == expected
    assert naive_output_size(w, h, s, max_size) == expected


def test_resize_output_size_matches_naive_rule_on_a_grid():
    rng = random.Random(0)
    for _ in range(2000):
        w, h = rng.randint(1, 2000), rng.randint(1, 2000)
        s = rng.choice([*DEFAULT_TRAIN_SCALES, 1, 7, 96, 333])
        max_size = rng.choice([None, 1333, 128, 1000, 97])
        assert resize_output_size((w, h), s, max_size) == naive_output_size(w, h, s, max_size)


# ----------------------------------------------------------------------------------------------
# Geometry of single transforms.

BOXES = [[10.0, 5.0, 50.0, 40.0], [0.0, 0.0, 100.0, 60.0], [83.5, 20.25, 99.0, 59.0]]


def test_resize_scales_boxes_area_and_size():
    image = Image.new("RGB", (100, 60))
    target = make_target(BOXES, 100, 60)
    out_image, out = resize(image, target, 45, max_size=70)
    oh, ow = naive_output_size(100, 60, 45, 70)
    assert out_image.size == (ow, oh)
    assert out["size"].tolist() == [oh, ow]
    assert_close(out["boxes"], naive_resize_boxes(BOXES, 100, 60, ow, oh))
    area = [(b[2] - b[0]) * (b[3] - b[1]) * (ow / 100) * (oh / 60) for b in BOXES]
    assert_close(out["area"], area, atol=1e-2)
    assert out["labels"].tolist() == [1, 2, 3]
    assert torch.equal(out["orig_size"], target["orig_size"])
    assert torch.equal(target["boxes"], make_target(BOXES, 100, 60)["boxes"]), "input modified"


def test_resize_image_is_bilinear_pil_resize():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    out_image, _ = resize(image, None, 20)
    reference = image.resize((33, 20), Image.Resampling.BILINEAR)
    assert np.array_equal(np.asarray(out_image), np.asarray(reference))


def test_crop_shifts_clips_and_removes_boxes():
    image = Image.new("RGB", (100, 60))
    boxes = [*BOXES, [90.0, 50.0, 99.0, 59.0], [0.0, 0.0, 15.0, 7.0]]  # last two: outside/edge
    labels = [1, 2, 3, 4, 5]
    target = make_target(boxes, 100, 60, labels)
    region = (7, 15, 35, 70)  # top, left, height, width
    out_image, out = crop(image, target, region)
    exp_boxes, exp_labels, exp_area = naive_crop(boxes, labels, *region)
    assert out_image.size == (70, 35)
    assert out["size"].tolist() == [35, 70]
    assert out["labels"].tolist() == exp_labels
    assert exp_labels == [1, 2, 3], "the reference itself removes the two outside boxes"
    assert_close(out["boxes"], exp_boxes)
    assert_close(out["area"], exp_area)
    assert len(out["iscrowd"]) == len(exp_labels)


def test_crop_image_pixels():
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    out_image, _ = crop(Image.fromarray(array), None, (3, 4, 20, 30))
    assert np.array_equal(np.asarray(out_image), array[3:23, 4:34])


def test_hflip_boxes_and_pixels():
    rng = np.random.default_rng(2)
    array = rng.integers(0, 256, (60, 100, 3), dtype=np.uint8)
    target = make_target(BOXES, 100, 60)
    out_image, out = hflip(Image.fromarray(array), target)
    assert np.array_equal(np.asarray(out_image), array[:, ::-1])
    assert_close(out["boxes"], naive_hflip(BOXES, 100))
    assert torch.equal(out["area"], target["area"])


def test_to_tensor_divides_by_255_exactly():
    rng = np.random.default_rng(3)
    array = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    tensor, _ = ToTensor()(Image.fromarray(array), None)
    expected = np.transpose(array.astype(np.float32) / np.float32(255), (2, 0, 1))
    assert tensor.dtype == torch.float32
    assert np.array_equal(tensor.numpy(), expected)


def test_normalize_image_and_boxes_to_relative_cxcywh():
    rng = np.random.default_rng(4)
    image = torch.from_numpy(rng.random((3, 60, 100), dtype=np.float32))
    target = make_target(BOXES, 100, 60)
    out_image, out = Normalize(IMAGENET_MEAN, IMAGENET_STD)(image, target)
    # The same float32 operations in numpy: (x - mean) / std, elementwise, correctly rounded.
    mean = np.array(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.array(IMAGENET_STD, dtype=np.float32)[:, None, None]
    np.testing.assert_array_equal(out_image.numpy(), (image.numpy() - mean) / std)
    expected = [
        [(x0 + x1) / 2 / 100, (y0 + y1) / 2 / 60, (x1 - x0) / 100, (y1 - y0) / 60]
        for x0, y0, x1, y1 in BOXES
    ]
    assert_close(out["boxes"], expected, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Random transforms.


def test_random_size_crop_draws_sizes_in_range_and_region_inside():
    image = Image.new("RGB", (90, 70))
    target = make_target([[0.0, 0.0, 90.0, 70.0]], 90, 70)
    random.seed(0)
    torch.manual_seed(0)
    seen_sizes = set()
    for _ in range(200):
        out_image, out = RandomSizeCrop(40, 80)(image, target)
        w, h = out_image.size
        assert 40 <= w <= 80 and 40 <= h <= 70
        x0, y0, x1, y1 = out["boxes"][0].tolist()  # the full-image box, clipped to the crop
        assert (x0, y0, x1, y1) == (0.0, 0.0, w, h)
        seen_sizes.add((w, h))
    assert len(seen_sizes) > 20


def test_random_size_crop_keeps_a_side_shorter_than_min_size():
    image = Image.new("RGB", (30, 70))
    for seed in range(20):
        random.seed(seed)
        out_image, _ = RandomSizeCrop(40, 60)(image, None)
        assert out_image.size[0] == 30 and 40 <= out_image.size[1] <= 60


def test_random_flip_and_select_probability_extremes():
    image = Image.new("RGB", (100, 60))
    target = make_target(BOXES, 100, 60)
    _, never = RandomHorizontalFlip(p=0.0)(image, target)
    _, always = RandomHorizontalFlip(p=1.0)(image, target)
    assert torch.equal(never["boxes"], target["boxes"])
    assert_close(always["boxes"], naive_hflip(BOXES, 100))

    def first(i, t):
        return "first", t

    def second(i, t):
        return "second", t

    assert RandomSelect(first, second, p=1.0)(image, target)[0] == "first"
    assert RandomSelect(first, second, p=0.0)(image, target)[0] == "second"


def test_crop_branch_sizes_default_is_the_original():
    assert crop_branch_sizes(DEFAULT_TRAIN_SCALES) == ([400, 500, 600], (384, 600))
    assert crop_branch_sizes([64, 80, 96]) == ([48, 60, 72], (46, 72))


def args_for(**overrides) -> Namespace:
    values = {
        "train_scales": None,
        "train_max_size": 1333,
        "crop_aug": True,
        "val_size": 800,
        "val_max_size": 1333,
    }
    values.update(overrides)
    return complete_args(Namespace(**values))  # the data code reads completed options


def naive_train_pipeline(w, h, boxes, labels, scales, max_size, pre, crop_range):
    """The original's train pipeline (flip, then resize or resize-crop-resize) on boxes only,
    drawing from the RNGs in the original's order."""
    if random.random() < 0.5:
        boxes = naive_hflip(boxes, w)
    area = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]

    def do_resize(w, h, boxes, area, sizes, cap):
        oh, ow = naive_output_size(w, h, random.choice(sizes), cap)
        scale = (ow / w) * (oh / h)
        return ow, oh, naive_resize_boxes(boxes, w, h, ow, oh), [a * scale for a in area]

    if random.random() < 0.5:
        w, h, boxes, area = do_resize(w, h, boxes, area, scales, max_size)
    else:
        w, h, boxes, area = do_resize(w, h, boxes, area, pre, None)
        tw = random.randint(crop_range[0], min(w, crop_range[1]))
        th = random.randint(crop_range[0], min(h, crop_range[1]))
        top, left, th, tw = transforms_v1.RandomCrop.get_params(Image.new("RGB", (w, h)), (th, tw))
        boxes, labels, area = naive_crop(boxes, labels, top, left, th, tw)
        w, h = tw, th
        w, h, boxes, area = do_resize(w, h, boxes, area, scales, max_size)
    return w, h, boxes, labels, area


@pytest.mark.parametrize("scales", [None, [64, 80, 96]])
def test_train_pipeline_matches_the_naive_pipeline(scales):
    w, h = (640, 480) if scales is None else (120, 90)
    boxes = [[w * 0.1, h * 0.1, w * 0.5, h * 0.6], [w * 0.6, h * 0.2, w * 0.95, h * 0.9]]
    labels = [3, 9]
    max_size = 1333 if scales is None else 128
    transform = make_transforms("train", args_for(train_scales=scales, train_max_size=max_size))
    scale_list = list(scales or DEFAULT_TRAIN_SCALES)
    pre, crop_range = crop_branch_sizes(scale_list)
    image = Image.new("RGB", (w, h))
    for seed in range(12):
        random.seed(seed)
        torch.manual_seed(seed)
        out_image, out = transform(image, make_target(boxes, w, h, labels))
        random.seed(seed)
        torch.manual_seed(seed)
        ew, eh, eboxes, elabels, earea = naive_train_pipeline(
            w, h, boxes, labels, scale_list, max_size, pre, crop_range
        )
        assert tuple(out_image.shape) == (3, eh, ew)
        assert out["size"].tolist() == [eh, ew]
        assert out["labels"].tolist() == elabels
        cxcywh = [
            [(x0 + x1) / 2 / ew, (y0 + y1) / 2 / eh, (x1 - x0) / ew, (y1 - y0) / eh]
            for x0, y0, x1, y1 in eboxes
        ]
        assert_close(out["boxes"], cxcywh, atol=1e-5)
        assert_close(out["area"], earea, atol=0.05)


def test_val_pipeline_size_and_boxes():
    transform = make_transforms("val", args_for(val_size=80, val_max_size=100))
    image = Image.new("RGB", (150, 90))
    out_image, out = transform(image, make_target([[15.0, 9.0, 75.0, 45.0]], 150, 90))
    oh, ow = naive_output_size(150, 90, 80, 100)
    assert tuple(out_image.shape) == (3, oh, ow)
    assert_close(out["boxes"], [[0.3, 0.3, 0.4, 0.4]], atol=1e-6)  # relative: unchanged by resize


def test_train_without_crop_aug_never_removes_boxes():
    transform = make_transforms("train", args_for(train_scales=[64, 80, 96], crop_aug=False))
    image = Image.new("RGB", (120, 90))
    for seed in range(20):
        random.seed(seed)
        out_image, out = transform(image, make_target(BOXES, 120, 90))
        assert min(out_image.shape[1:]) in (64, 80, 96)
        assert len(out["boxes"]) == len(BOXES)


def test_train_without_any_augmentation_is_deterministic():
    """--no_crop_aug --no_flip_aug with one scale: the train pipeline is a fixed resize."""
    args = args_for(train_scales=[64], crop_aug=False, flip_aug=False)
    transform = make_transforms("train", args)
    reference = make_transforms("val", args_for(val_size=64, val_max_size=1333))
    image = Image.effect_noise((120, 90), 40).convert("RGB")
    expected_image, expected = reference(image, make_target(BOXES, 120, 90))
    with_flip = make_transforms("train", args_for(train_scales=[64], crop_aug=False))
    flipped = 0
    for seed in range(12):
        random.seed(seed)
        out_image, out = transform(image, make_target(BOXES, 120, 90))
        torch.testing.assert_close(out_image, expected_image)
        torch.testing.assert_close(out["boxes"], expected["boxes"])
        random.seed(seed)
        flipped += not torch.equal(with_flip(image, make_target(BOXES, 120, 90))[0], out_image)
    assert 0 < flipped < 12  # the same seeds do flip some images when the flip is on


def test_unknown_image_set_is_refused():
    with pytest.raises(ValueError, match="image_set"):
        make_transforms("training", args_for())


# ----------------------------------------------------------------------------------------------
# Boxes stay on the drawn objects through the whole train pipeline.

RED, GREEN = (255, 0, 0), (0, 255, 0)


def test_boxes_still_cover_their_objects_after_train_transforms():
    w, h = 120, 90
    image = Image.new("RGB", (w, h), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    objects = {1: ([20, 15, 60, 55], RED), 2: ([75, 30, 110, 80], GREEN)}
    for (x0, y0, x1, y1), color in objects.values():
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=color)  # pixels x0..x1-1 = box [x0, x1)
    target = make_target([b for b, _ in objects.values()], w, h, list(objects))
    transform = make_transforms("train", args_for(train_scales=[64, 80, 96], train_max_size=128))
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    kept_counts = set()
    for seed in range(40):
        random.seed(seed)
        torch.manual_seed(seed)
        tensor, out = transform(image, target)
        pixels = (tensor * std + mean).clamp(0, 1)  # (3, H, W) back in [0, 1]
        H, W = pixels.shape[1:]
        scale = torch.tensor([W, H, W, H])
        cx, cy, bw, bh = (out["boxes"] * scale).unbind(-1)
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
        far_from_boxes = torch.ones(H, W, dtype=torch.bool)
        for (x0, y0, x1, y1), label in zip(boxes.tolist(), out["labels"].tolist(), strict=True):
            channel = 0 if label == 1 else 1
            inner = pixels[:, int(y0) + 2 : int(y1) - 2, int(x0) + 2 : int(x1) - 2]
            if inner.numel():
                assert inner[channel].min() > 0.8, f"seed {seed}: box {label} misses its object"
                assert inner[1 - channel].max() < 0.2
            far_from_boxes[max(int(y0) - 2, 0) : int(y1) + 3, max(int(x0) - 2, 0) : int(x1) + 3] = 0
        assert pixels[:, far_from_boxes].max() < 0.2, f"seed {seed}: object without a box"
        kept_counts.add(len(out["boxes"]))
    assert 2 in kept_counts
