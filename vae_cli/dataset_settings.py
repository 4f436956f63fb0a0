"""The dataset settings (conf/dataset/*.yaml): the typed arguments of ImageData, without Lightning.

``vae_cli.datamodule.ImageData`` inherits this ``__init__``; the validator reads it from here, so
commands that only read a checkpoint do not import Lightning to check its dataset node.
"""

from __future__ import annotations

from typing import Literal

from vae_cli.errors import NewRunsOnly
from vae_cli.typed import Fraction, ImageShape, PosInt, Seed, Text

# The shape each named dataset's images have ("folder" images are resized to any shape).
NATIVE_SHAPES = {"mnist": [1, 28, 28], "fashion_mnist": [1, 28, 28], "cifar10": [3, 32, 32]}
TEST_SIZES = {"mnist": 10_000, "fashion_mnist": 10_000, "cifar10": 10_000}  # images in the test split


class DatasetSettings:
    """A dataset and how it is batched and binarized; ``likelihood`` is given by `vae train`."""

    GIVEN_BY_VAE = ("likelihood",)  # from likelihood=...: +dataset.likelihood was saved, then overridden

    def __init__(
        self,
        name: Literal["mnist", "fashion_mnist", "cifar10", "folder"],
        data_dir: Text,
        shape: ImageShape,
        batch_size: PosInt = 128,
        eval_batch_size: PosInt = 1000,
        binarize: Literal["dynamic", "static", "none"] = "dynamic",
        validation: Literal["holdout", "test"] = "holdout",
        path: Text | None = None,
        val_fraction: Fraction = 0.1,
        likelihood: Literal["bernoulli", "gaussian"] = "bernoulli",
        seed: Seed = 0,
    ) -> None:
        self.name, self.data_dir, self.shape, self.path = name, data_dir, list(shape), path
        self.batch_size, self.eval_batch_size, self.val_fraction = batch_size, eval_batch_size, val_fraction
        self.binarize, self.validation, self.seed, self.likelihood = binarize, validation, seed, likelihood

    @staticmethod
    def check_settings(args: dict) -> None:
        """A named dataset's shape is its images' shape; a folder needs its path."""
        native = NATIVE_SHAPES.get(args["name"])
        if native is not None and list(args["shape"]) != native:
            raise ValueError(f"shape={args['shape']} is not allowed: {args['name']} images are {native} "
                             "(dataset=folder resizes your own images to any shape)")
        if args["name"] == "folder" and not args.get("path"):
            raise ValueError("path is missing: dataset=folder needs dataset.path=DIR, a folder of images")
        if args["name"] == "folder" and args.get("validation", "holdout") == "test":
            # a folder's test images are its held-out val images: train+val would train on them
            raise NewRunsOnly("validation='test' is not allowed with dataset=folder: a folder has no separate test "
                              "set (test is the held-out val images), so it would train on them; use holdout")
        for key in ("path", "val_fraction"):  # read for a folder of images only: elsewhere they were ignored
            if args["name"] != "folder" and args.get(key) is not None:
                raise NewRunsOnly(f"{key}={args[key]!r} is not allowed with dataset.name={args['name']}: it is a "
                                  "setting of dataset=folder (your own images)")
