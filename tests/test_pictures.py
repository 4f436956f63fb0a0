"""The picture commands on a tiny trained model: sizes, content, paths, run lookup, no overwrite, safety."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_main, vae
from vae_cli import pictures
from vae_cli.errors import UserError
from vae_cli.runs import load_model

CELL = 28 + 2  # an image plus its padding


def grid_size(rows: int, cols: int) -> tuple[int, int]:
    return (cols * CELL + 2, rows * CELL + 2)  # PIL: (width, height)


def run_cmd(*args: str) -> int:
    return run_main(*args)


def test_sample_grid_follows_n_and_nrow_and_is_not_constant(trained_run, data_dir, tmp_path, capsys):
    out = tmp_path / "s.png"
    assert run_cmd("sample", f"run={trained_run}", "n=10", "nrow=4", f"out={out}") == 0
    assert capsys.readouterr().out.strip() == str(out)
    im = Image.open(out)
    assert im.size == grid_size(3, 4)
    a = np.asarray(im, dtype=float)
    assert a.std() > 1.0
    cells = [a[2 + r * CELL : r * CELL + 30, 2 + c * CELL : c * CELL + 30] for r in range(2) for c in range(4)]
    assert max(np.abs(cells[0] - c).max() for c in cells[1:]) > 0   # the samples differ from each other


def test_sample_is_seeded_and_temperature_matters(trained_run, tmp_path):
    model, _, _ = load_model(str(trained_run))
    a, b = pictures.sample_images(model, 8, seed=1), pictures.sample_images(model, 8, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, pictures.sample_images(model, 8, seed=2))
    assert not torch.equal(a, pictures.sample_images(model, 8, temperature=0.1, seed=1))
    drawn = pictures.sample_images(model, 8, mode="sample", seed=1)
    assert set(drawn.unique().tolist()) <= {0.0, 1.0}      # a Bernoulli draw is binary


def test_default_output_goes_to_the_run_and_never_overwrites(trained_run, tmp_path):
    before = set((trained_run / "samples").glob("sample-*.png")) if (trained_run / "samples").exists() else set()
    for _ in range(2):
        assert run_cmd("sample", f"run={trained_run}", "n=4") == 0
    new = sorted(set((trained_run / "samples").glob("sample-*.png")) - before)
    assert len(new) == 2 and new[0] != new[1]
    existing = tmp_path / "taken.png"
    existing.write_bytes(b"precious")
    assert run_cmd("sample", f"run={trained_run}", f"out={existing}") == 2
    assert existing.read_bytes() == b"precious"


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_latent_path_endpoints_equal_the_codes(method):
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(5, generator=g), torch.randn(5, generator=g)
    path = pictures.latent_path(z0, z1, 7, method)
    assert path.shape == (7, 5)
    assert torch.allclose(path[0], z0, atol=1e-6) and torch.allclose(path[-1], z1, atol=1e-6)
    if method == "slerp":  # between codes of equal norm, slerp stays on the sphere; lerp cuts inside
        z1 = z1 * z0.norm() / z1.norm()
        assert torch.allclose(pictures.latent_path(z0, z1, 7, "slerp").norm(dim=1), z0.norm(), atol=1e-5)
        assert pictures.latent_path(z0, z1, 7, "linear").norm(dim=1)[3] < z0.norm() - 1e-3


def test_interpolate_rows_have_inputs_at_both_ends(trained_run, tmp_path):
    out = tmp_path / "i.png"
    assert run_cmd("interpolate", f"run={trained_run}", "pairs=3", "steps=5", f"out={out}", "gif=true") == 0
    assert Image.open(out).size == grid_size(3, 5 + 2)
    gif = Image.open(tmp_path / "i.gif")
    assert gif.n_frames == 5 + 3 and gif.size == grid_size(1, 3)
    prior = tmp_path / "p.png"
    assert run_cmd("interpolate", f"run={trained_run}", "source=prior", "pairs=2", "steps=6", "method=slerp",
                   f"out={prior}") == 0
    assert Image.open(prior).size == grid_size(2, 6)


def test_interpolate_row_starts_at_the_real_input(trained_run, data_dir, tmp_path):
    out = tmp_path / "i.png"
    assert run_cmd("interpolate", f"run={trained_run}", "pairs=1", "steps=3", f"out={out}") == 0
    a = np.asarray(Image.open(out).convert("L"), dtype=float)
    first = torch.load(data_dir / "mnist.pt", weights_only=True)["test"][0, 0].numpy().astype(float)
    assert np.abs(a[2:30, 2:30] - first).max() <= 1.0


def test_reconstruct_traverse_and_manifold_sizes(trained_run, trained_run_2d, tmp_path, capsys):
    assert run_cmd("reconstruct", f"run={trained_run}", "n=5", f"out={tmp_path / 'r.png'}") == 0
    assert Image.open(tmp_path / "r.png").size == grid_size(2, 5)
    assert run_cmd("traverse", f"run={trained_run}", "steps=6", f"out={tmp_path / 't.png'}") == 0
    assert Image.open(tmp_path / "t.png").size == grid_size(4, 6)   # latent_dim=4 rows
    assert "rows, by KL" in capsys.readouterr().err
    assert run_cmd("manifold", f"run={trained_run_2d}", "steps=5", f"out={tmp_path / 'm.png'}") == 0
    assert Image.open(tmp_path / "m.png").size == grid_size(5, 5)
    assert run_cmd("manifold", f"run={trained_run}", f"out={tmp_path / 'no.png'}") == 2
    assert "latent_dim=4" in capsys.readouterr().err and not (tmp_path / "no.png").exists()


def test_traverse_rows_follow_kl_order(trained_run):
    model, config, _ = load_model(str(trained_run))
    x = torch.rand(64, 1, 28, 28)
    kl = pictures.kl_per_dimension(model, x)
    assert kl.shape == (4,) and (kl >= 0).all()
    assert torch.allclose(kl.sum(), torch.distributions.kl_divergence(model.posterior(x), model.prior).mean(), atol=1e-4)


def test_newest_run_is_the_default(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("2026-01-01/10-00-00", "2026-01-01/09-00-00"):  # copied in this order: 09 is newer on disk
        shutil.copytree(trained_run, tmp_path / "outputs" / name)
        time.sleep(0.01)
        os.utime(tmp_path / "outputs" / name / "checkpoints" / "last.ckpt")
    from vae_cli.runs import newest_run

    assert newest_run() == Path("outputs/2026-01-01/09-00-00")
    assert run_cmd("sample", "n=4") == 0
    assert list((tmp_path / "outputs/2026-01-01/09-00-00/samples").glob("sample-*.png"))


def test_checkpoint_with_a_pickled_payload_is_refused_without_running_it(trained_run, tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["extra"] = Payload()
    torch.save(ckpt, evil)
    assert run_cmd("sample", f"ckpt={evil}", f"out={tmp_path / 'x.png'}") == 2
    err = capsys.readouterr().err
    assert "is not a vae-cli checkpoint" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "x.png").exists()


def test_bad_inputs_are_one_line_and_write_nothing(trained_run, tmp_path, capsys):
    cases = [
        ("sample", "run=/no/such/run"),
        ("sample", f"ckpt={tmp_path / 'none.ckpt'}"),
        ("interpolate", "index=1000000"),
        ("reconstruct", "n=0"),
    ]
    not_ckpt = tmp_path / "notes.ckpt"
    not_ckpt.write_text("hello")
    cases.append(("sample", f"ckpt={not_ckpt}"))
    for command, arg in cases:
        extra = [] if arg.startswith(("run=", "ckpt=")) else [f"run={trained_run}"]
        assert run_cmd(command, arg, *extra, f"out={tmp_path / 'out.png'}") == 2, (command, arg)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("vae: error: "), err
        assert not (tmp_path / "out.png").exists()


def test_checkpoint_copied_elsewhere_still_loads(trained_run, tmp_path):
    copy = tmp_path / "elsewhere.ckpt"
    shutil.copy(trained_run / "checkpoints" / "last.ckpt", copy)
    assert run_cmd("sample", f"ckpt={copy}", "n=4", f"out={tmp_path / 'c.png'}") == 0


def test_a_checkpoint_whose_config_names_other_code_is_refused(trained_run, tmp_path, capsys):
    """weights_only guards the unpickling; the config it carries is checked before Hydra builds anything."""
    marker = tmp_path / "written"
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    payloads = [
        {"_target_": "pathlib.Path.write_text", "_args_": [{"_target_": "pathlib.Path", "_args_": [str(marker)]}, "x"]},
        "${oc.create:{_target_: builtins.open, _args_: ['" + str(marker) + "', 'w']}}",   # via an interpolation
    ]
    for i, payload in enumerate(payloads):
        evil_ckpt = {**ckpt, "vae_cli": {**ckpt["vae_cli"], "config": {**ckpt["vae_cli"]["config"]}}}
        if isinstance(payload, dict):
            evil_ckpt["vae_cli"]["config"]["model"] = payload
        else:
            evil_ckpt["vae_cli"]["config"]["model"] = {**ckpt["vae_cli"]["config"]["model"], "latent_dim": payload}
        evil = tmp_path / f"config{i}.ckpt"
        torch.save(evil_ckpt, evil)
        assert run_cmd("sample", f"ckpt={evil}", f"out={tmp_path / 'x.png'}") == 2
        err = capsys.readouterr().err
        assert "refused" in err and len(err.strip().splitlines()) == 1, err
        assert not marker.exists() and not (tmp_path / "x.png").exists()


def test_gif_and_png_never_overwrite(trained_run, tmp_path):
    samples = trained_run / "samples"
    assert run_cmd("interpolate", f"run={trained_run}", "pairs=1", "steps=3", "gif=true") == 0
    first = sorted(samples.glob("interpolate-*.gif"))[-1]
    gif_bytes = first.read_bytes()
    first.with_suffix(".png").unlink()                       # the PNG's name is free again, the GIF's is not
    assert run_cmd("interpolate", f"run={trained_run}", "pairs=1", "steps=4", "gif=true") == 0
    assert first.read_bytes() == gif_bytes
    assert run_cmd("interpolate", f"run={trained_run}", "gif=true", f"out={tmp_path / 'a.gif'}") == 2


def test_gif_frames_wider_than_a_gif_can_hold_are_refused_before_any_work(trained_run, tmp_path, capsys):
    """pairs=2185 of 28-pixel images side by side: 65,552 pixels, past the GIF's two-byte width. PIL
    failed with a traceback after the work, and the PNG went with it."""
    from vae_cli.pictures import GIF_MAX_SIDE, check_gif_width

    check_gif_width(2184, 28)                                             # 65,522 pixels: fits
    with pytest.raises(UserError, match="pairs=2185 with gif=true makes GIF frames 65552 pixels wide"):
        check_gif_width(2185, 28)
    assert GIF_MAX_SIDE == 65535
    capsys.readouterr()
    assert run_cmd("interpolate", f"run={trained_run}", "pairs=2185", "steps=2", "gif=true",
                   f"out={tmp_path / 'wide.png'}") == 2
    assert "ask for at most 2184 pairs" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_a_sweep_with_one_out_for_several_jobs_is_refused_before_the_first(trained_run, tmp_path, capsys):
    """The second job found the file taken, after the first had done its work."""
    for outs in (f"out={tmp_path / 'one.png'}", f"out={tmp_path / 'a.png'},{tmp_path / 'b.png'}"):
        capsys.readouterr()
        assert run_cmd("sample", "-m", f"run={trained_run}", "n=4", "seed=0,1", outs) == 2
        err = capsys.readouterr().err
        assert "for the 2 jobs of this sweep" in err or "for the 4 jobs of this sweep" in err, err
        assert not list(tmp_path.glob("*.png"))
    assert run_cmd("sample", "-m", f"run={trained_run}", "n=4", f"out={tmp_path / 'a.png'},{tmp_path / 'b.png'}") == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["a.png", "b.png"]


@pytest.mark.parametrize("channels", [1, 3])
def test_tensorboard_image_keeps_its_channels_and_pixels(tmp_path, channels):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from vae_cli.callbacks import add_image

    image = torch.rand(channels, 10, 14, generator=torch.Generator().manual_seed(0))  # (C, H, W) in [0, 1]
    writer = SummaryWriter(str(tmp_path))
    add_image(writer, "val/samples", image, step=7)
    writer.add_image("torch", image, 7)  # what SummaryWriter writes for the same image
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    ours, theirs = acc.Images("val/samples")[0], acc.Images("torch")[0]
    assert (ours.step, ours.width, ours.height) == (theirs.step, theirs.width, theirs.height) == (7, 14, 10)
    got = np.array(Image.open(io.BytesIO(ours.encoded_image_string)))
    assert got.shape == ((10, 14) if channels == 1 else (10, 14, 3))  # grey stays one channel
    want = (image * 255).round().to(torch.uint8).permute(1, 2, 0).squeeze(-1).numpy()
    assert np.array_equal(got, want)


def test_tensorboard_image_through_another_writer_uses_its_add_image():
    from vae_cli.callbacks import add_image

    class Writer:  # e.g. another logger's experiment: no torch file writer
        def add_image(self, tag, image, step):
            self.got = (tag, image.shape, step)

    w = Writer()
    add_image(w, "val/samples", torch.zeros(1, 4, 4), 3)
    assert w.got == ("val/samples", (1, 4, 4), 3)

    class TorchWriter(Writer):  # a uint8 image (0-255) goes to the writer's own add_image, which scales it so
        def _get_file_writer(self):
            raise AssertionError("a uint8 image was written as if in [0, 1]")

    w = TorchWriter()
    add_image(w, "val/samples", torch.full((1, 4, 4), 200, dtype=torch.uint8), 5)
    assert w.got == ("val/samples", (1, 4, 4), 5)


def test_traverse_refuses_a_picture_too_large_before_any_work(trained_run, tmp_path, capsys, monkeypatch):
    """steps=1000000 on a 20-d model allocated until the kernel killed it (23 GB): like interpolate and
    manifold, traverse now weighs its picture (rows x steps images) first and refuses it in one line.
    Here the memory free is made small, so a modest picture stands for a huge one."""
    import vae_cli.errors

    monkeypatch.setattr(vae_cli.errors, "available_memory", lambda device=None: 10**6)
    out = tmp_path / "t.png"
    assert run_cmd("traverse", f"run={trained_run}", "steps=100", f"out={out}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("vae: error: steps=100 (4 rows, one per latent dimension) makes a "
                                                 "picture of 400 images"), err
    assert "free here: ask for fewer" in err[0] and not out.exists()
    assert run_cmd("traverse", f"run={trained_run}", "steps=100", "dims=2", f"out={out}") == 2
    assert "steps=100 dims=2 makes a picture of 200 images" in capsys.readouterr().err and not out.exists()
    monkeypatch.undo()
    for arg, message in (("dims=5", "dims=5 is more than this model has: give at most its 4 latent dimensions"),
                         ("index=1000000", "index=1000000 runs past the test split")):
        assert run_cmd("traverse", f"run={trained_run}", arg, f"out={out}") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not out.exists()
