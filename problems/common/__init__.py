"""Helpers shared by the problem families: the bundled data sets and their seeded train /
validation / test splits (every family); and for the families whose upper variables are images
(dataset distillation, data poisoning): image data sets as (N, C, H, W) tensors, fresh models
trained from a random initialization for evaluation, PNG image grids and result tables."""

from __future__ import annotations

from problems.common.classifier import check_classifier_input, classifier_logits, classifier_squared_norm
from problems.common.data import Split, bundled, class_count, digits_images, part_source, shuffled_split, standardized
from problems.common.images import ImageDataset, Positive, class_balanced_subset, image_split, one_hot
from problems.common.models import convnet, linear, make_model, mlp, seeded
from problems.common.outputs import format_cell, markdown_table, mean_std, run_command, save_image_grid, write_table
from problems.common.training import accuracy, fit_linear, train_model

__all__ = [
    "ImageDataset",
    "Positive",
    "Split",
    "accuracy",
    "bundled",
    "check_classifier_input",
    "class_balanced_subset",
    "class_count",
    "classifier_logits",
    "classifier_squared_norm",
    "convnet",
    "digits_images",
    "fit_linear",
    "format_cell",
    "image_split",
    "linear",
    "make_model",
    "markdown_table",
    "mean_std",
    "mlp",
    "one_hot",
    "part_source",
    "run_command",
    "save_image_grid",
    "seeded",
    "shuffled_split",
    "standardized",
    "train_model",
    "write_table",
]
