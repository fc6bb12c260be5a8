"""Detections drawn on the first validation images (``detr_irpe.preview``), which the
experiment trackers log after each evaluation."""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable

import torch
from PIL import ImageChops

from detr_irpe.data.coco import build_dataset
from detr_irpe.data.transforms import make_transforms
from detr_irpe.models import build_model
from detr_irpe.preview import draw_previews


def test_the_first_images_are_drawn_and_the_model_mode_is_kept(
    make_args: Callable[..., Namespace], one_thread: None
) -> None:
    args = make_args("--num_classes", "5")
    torch.manual_seed(0)
    model, _, postprocessors = build_model(args)
    dataset = build_dataset("val", args)
    model.train()
    drawn = draw_previews(
        model, postprocessors["bbox"], dataset, make_transforms("val", args), "cpu",
        count=2, threshold=0.0,
    )  # fmt: skip
    assert model.training  # the next training epoch is not run in eval mode
    first = dataset.ids[:2]
    assert list(drawn) == [dataset.coco.imgs[i]["file_name"] for i in first]
    for image_id, picture in zip(first, drawn.values(), strict=True):
        original = dataset.load_image(image_id)
        assert picture.mode == "RGB" and picture.size == original.size
        # threshold 0: every query's box is drawn, so the picture is not the bare image
        assert ImageChops.difference(picture, original).getbbox() is not None

    none = draw_previews(
        model, postprocessors["bbox"], dataset, make_transforms("val", args), "cpu",
        count=1, threshold=1.0,  # no untrained score reaches 1
    )  # fmt: skip
    (picture,) = none.values()
    assert ImageChops.difference(picture, dataset.load_image(first[0])).getbbox() is None
