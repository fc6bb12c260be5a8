"""Padded batches: layout, mask, collation and input validation."""

from __future__ import annotations

import pytest
import torch

from detr_irpe.nested_tensor import NestedTensor, collate_fn, nested_tensor_from_tensor_list


def test_padding_and_mask_match_a_naive_copy() -> None:
    images = [torch.rand(3, 5, 7), torch.rand(3, 8, 4), torch.rand(3, 2, 2)]
    batch = nested_tensor_from_tensor_list(images)
    tensors, mask = batch.decompose()
    assert tensors.shape == (3, 3, 8, 7)
    assert mask.shape == (3, 8, 7) and mask.dtype == torch.bool
    for b, image in enumerate(images):
        _, h, w = image.shape
        for r in range(8):
            for c in range(7):
                inside = r < h and c < w
                assert bool(mask[b, r, c]) is (not inside)
                expected = image[:, r, c] if inside else torch.zeros(3)
                assert torch.equal(tensors[b, :, r, c], expected)


def test_dtype_and_device_follow_the_first_image() -> None:
    batch = nested_tensor_from_tensor_list([torch.rand(3, 2, 2, dtype=torch.float64)])
    assert batch.tensors.dtype == torch.float64
    assert batch.device == torch.device("cpu")


def test_to_moves_both_tensors_and_keeps_values() -> None:
    batch = nested_tensor_from_tensor_list([torch.rand(3, 4, 5), torch.rand(3, 2, 6)])
    moved = batch.to("cpu", non_blocking=True)
    assert isinstance(moved, NestedTensor)
    assert torch.equal(moved.tensors, batch.tensors) and torch.equal(moved.mask, batch.mask)
    no_mask = NestedTensor(torch.zeros(1, 3, 2, 2), None).to("cpu")
    assert no_mask.mask is None


def test_collate_fn_pads_images_and_keeps_targets() -> None:
    targets = [
        {"labels": torch.tensor([1]), "image_id": torch.tensor([7])},
        {"labels": torch.tensor([])},
    ]
    batch = [(torch.rand(3, 4, 6), targets[0]), (torch.rand(3, 5, 3), targets[1])]
    samples, collated = collate_fn(batch)
    assert isinstance(samples, NestedTensor)
    assert samples.tensors.shape == (2, 3, 5, 6)
    assert isinstance(collated, tuple) and collated[0] is targets[0] and collated[1] is targets[1]


def test_a_4d_tensor_is_split_into_images() -> None:
    images = torch.rand(2, 3, 4, 5)
    batch = nested_tensor_from_tensor_list(images)
    assert torch.equal(batch.tensors, images)
    assert not batch.mask.any()


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([torch.rand(4, 4)], "image 0 .* only 3-D"),
        ([torch.rand(3, 4, 4), torch.rand(1, 3, 4, 4)], "image 1 .* only 3-D"),
        ([torch.rand(3, 4, 4), torch.rand(1, 4, 4)], "image 1 of the batch has 1 channels"),
        ([], "empty"),
    ],
)
def test_bad_images_are_rejected(images: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        nested_tensor_from_tensor_list(images)


def test_non_tensor_image_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"image 0 .* not a tensor"):
        nested_tensor_from_tensor_list([[1.0, 2.0]])


def test_collate_fn_rejects_samples_that_are_not_pairs() -> None:
    with pytest.raises(TypeError, match=r"sample 1 .* pair"):
        collate_fn([(torch.rand(3, 2, 2), {}), (torch.rand(3, 2, 2),)])


def test_mask_shape_is_validated() -> None:
    with pytest.raises(ValueError, match="does not match"):
        NestedTensor(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        NestedTensor(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4))


def test_size_multiple_rounds_the_padded_size_up() -> None:
    images = [torch.rand(3, 50, 70), torch.rand(3, 64, 20)]
    batch = nested_tensor_from_tensor_list(images, size_multiple=32)
    assert batch.tensors.shape == (2, 3, 64, 96) and batch.mask.shape == (2, 64, 96)
    for image, padded, mask in zip(images, batch.tensors, batch.mask, strict=True):
        h, w = image.shape[1:]
        assert torch.equal(padded[:, :h, :w], image) and not mask[:h, :w].any()
        assert mask.sum() == 64 * 96 - h * w and not padded[:, mask].any()
    exact = nested_tensor_from_tensor_list([torch.rand(3, 64, 96)], size_multiple=32)
    assert exact.tensors.shape == (1, 3, 64, 96) and not exact.mask.any()
    with pytest.raises(ValueError, match="size_multiple must be at least 1"):
        nested_tensor_from_tensor_list(images, size_multiple=0)
