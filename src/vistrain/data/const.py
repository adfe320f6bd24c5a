"""Names of the keys every part of vistrain agrees on."""

from __future__ import annotations


class CommonKeys:
    """Keys of a vistrain batch.

    Attributes:
        images: (B, 3, H, W) float tensor of network inputs.
        input_hw: list of (h, w) of each image as fed to the network.
        original_images: list of (H, W, 3) uint8 arrays before any transform.
        original_hw: list of (h, w) of each original image.
        sample_names: list of sample names (file stems).
        boxes2d: list of (N, 4) float tensors, xyxy in input-image pixels.
        boxes2d_classes: list of (N,) long tensors of contiguous class indices.
        coco_image_id: list of the COCO image ids of the samples (for evaluation).
        labels: (B,) long tensor of image-level class labels (classification).
    """

    images = "images"
    input_hw = "input_hw"
    original_images = "original_images"
    original_hw = "original_hw"
    sample_names = "sample_names"
    boxes2d = "boxes2d"
    boxes2d_classes = "boxes2d_classes"
    coco_image_id = "coco_image_id"
    labels = "labels"
