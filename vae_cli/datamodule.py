"""The LightningDataModule over the in-memory datasets of vae_cli.data."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from vae_cli.data import Batches, load_dataset, load_splits, pixel_mode, split_digests
from vae_cli.dataset_settings import DatasetSettings


class ImageData(DatasetSettings, pl.LightningDataModule):
    """A dataset held in memory as uint8 tensors, batched on the training device.

    Its arguments (``conf/dataset/*.yaml``) are DatasetSettings'; ``likelihood`` is passed by
    ``train`` to pick the pixel mode (Bernoulli: ``binarize``; Gaussian: dequantize).
    """

    def __init__(self, *args, **kwargs) -> None:
        pl.LightningDataModule.__init__(self)
        DatasetSettings.__init__(self, *args, **kwargs)
        self.mode = pixel_mode(self.binarize, self.likelihood)
        self.splits: dict[str, torch.Tensor] | None = None
        self.digests: dict[str, str] | None = None  # a folder's split_digests, kept in every checkpoint

    def load(self, legacy: bool = False) -> dict[str, torch.Tensor]:
        """The uint8 splits, loaded once (again with ``legacy``: a folder read as decoder 2 read it)."""
        if self.splits is None or legacy:
            binarize = self.binarize if self.mode == "static" else "none"
            self.splits = load_dataset(self.name, self.data_dir, self.shape, binarize, self.validation,
                                       self.path, self.val_fraction, legacy=legacy)
            if self.name == "folder":  # a named dataset's splits are fixed; a folder's follow its files
                self.digests = split_digests(self.splits)
        return self.splits

    def prepare_data(self) -> None:  # downloads happen once, on rank 0 of each node
        if self.name != "folder":
            load_splits(self.name, self.data_dir)

    def setup(self, stage: str | None = None) -> None:
        self.load()

    def _device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def split(self, name: str) -> torch.Tensor:
        """The uint8 tensor of a split, moved once to the training device."""
        x = self.load()[name]
        if x.device != self._device():
            x = self.splits[name] = x.to(self._device())
        return x

    def loader(self, split: str, train: bool = False) -> Batches:
        """Batches of one split: shuffled fresh draws for training, fixed order and noise otherwise."""
        trainer = self.trainer
        return Batches(
            self.split(split),
            self.batch_size if train else self.eval_batch_size,
            self.mode,
            shuffle=train,
            seed=self.seed,
            fixed_noise=not train,
            epoch=(lambda: trainer.current_epoch) if trainer is not None else (lambda: 0),
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
        )

    def transfer_batch_to_device(self, batch: object, device: torch.device, dataloader_idx: int) -> object:
        # The batches are made on the training device already (Batches); Lightning's transfer walks
        # a batch as a collection to call .to(device) on it: a few us a step, for nothing. Here on
        # the datamodule, not the LightningModule: Lightning warns when the module overrides this
        # hook and a datamodule is given.
        if isinstance(batch, torch.Tensor) and batch.device == device:
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train_dataloader(self) -> Batches:
        return self.loader("train", train=True)

    def val_dataloader(self) -> Batches:
        return self.loader("val")

    def test_dataloader(self) -> Batches:
        return self.loader("test")
