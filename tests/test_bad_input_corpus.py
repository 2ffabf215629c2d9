"""A corpus of bad inputs run against every subcommand that reads images or weights (issue 19): no
traceback in any output, every exit status 0 (bad files skipped and listed), 1 (nothing usable) or 2 (one
line naming the problem), and nothing already written lost or changed."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kl_autoencoder as ka
from kl_autoencoder import cli

from conftest import MICRO, perturb, sample_photos

EVIL_PICKLE = b"\x80\x04cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85q\x01Rq\x02."


def _images(d: Path) -> Path:
    """Good photos and every odd image kind a user's folder holds."""
    d.mkdir()
    rng = np.random.default_rng(0)
    for i, im in enumerate(sample_photos(48)[:2]):
        im.save(d / f"good{i}.png")
    base = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(base).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((rng.random((40, 40)) * 65535).astype(np.uint16)).save(d / "deep16.png")
    Image.fromarray(np.dstack([base, np.full((40, 40), 90, np.uint8)]), "RGBA").save(d / "alpha.png")
    Image.fromarray(base[:1, :1]).save(d / "one_pixel.png")
    buf = io.BytesIO()
    Image.fromarray(base).save(buf, "JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (d / "text.png").write_text("not an image at all")
    (d / "empty.jpg").write_bytes(b"")
    (d / "clip.gif").write_bytes(b"GIF89a")
    (d / "loop.png").symlink_to(d / "loop.png")
    # A non-UTF-8 file name is run in a subprocess by test_robustness.py: pytest's capture decodes strictly.
    return d


def _weights(d: Path) -> dict[str, Path]:
    """Broken weight files and folders beside one good model folder."""
    d.mkdir()
    good = d / "good"
    ka.export(perturb(ka.create(MICRO)), good)
    garbage = d / "garbage.safetensors"
    garbage.write_bytes(os.urandom(500))
    truncated = d / "truncated.safetensors"
    truncated.write_bytes((good / "diffusion_pytorch_model.safetensors").read_bytes()[:-200])
    evil = d / "evil.ckpt"
    evil.write_bytes(EVIL_PICKLE)
    nofile = d / "empty_folder"
    nofile.mkdir()
    badcfg = d / "bad_config"
    shutil.copytree(good, badcfg)
    (badcfg / "config.json").write_text("{ not json")
    return {"good": good, "garbage": garbage, "truncated": truncated, "evil": evil, "empty_folder": nofile, "bad_config": badcfg}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    return {"images": _images(root / "images"), **_weights(root / "weights"), "root": root}


def _run(argv: list[str], capsys, caplog) -> tuple[int, str]:
    """(exit status, everything printed or logged); an exception escaping main() fails the test by itself."""
    caplog.clear()
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse refusals
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err + caplog.text


def _guarded(out: Path) -> Path:
    """An output place that already holds a file of the user's: it must survive every command."""
    out.mkdir(parents=True, exist_ok=True)
    keep = out / "keep.txt"
    keep.write_text("the user's own file")
    return keep


IMAGE_COMMANDS = {
    "reconstruct": lambda m, d, o: ["reconstruct", m, str(d), "--out", str(o)],
    "stats": lambda m, d, o: ["stats", m, str(d), "--resolution", "32", "--num-workers", "0"],
    "eval": lambda m, d, o: ["eval", m, str(d), "--output", str(o), "--no-compression"],
    "score": lambda m, d, o: ["score", m, str(d), "--output", str(o / "s.csv")],
    "check-fp16": lambda m, d, o: ["check-fp16", m, str(d), "--no-write", "--size", "32"],
    "swap-images": lambda m, d, o: ["swap", str(o / "no_pipeline"), m, str(o / "swapped"), "--images", str(d)],
    "encode": lambda m, d, o: ["encode", m, str(d), str(o), "--resolution", "32", "--num-workers", "0"],
}


@pytest.mark.parametrize("command", sorted(IMAGE_COMMANDS))
def test_every_image_command_survives_the_image_corpus(command, corpus, tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_weights"))
    out = tmp_path / "out"
    keep = _guarded(out)
    argv = IMAGE_COMMANDS[command](str(corpus["good"]), corpus["images"], out)
    if command in ("reconstruct", "eval"):
        argv.append("--force")  # the guarded folder is not empty: writing into it is asked for here
    code, text = _run(argv, capsys, caplog)
    assert "Traceback" not in text, text[-3000:]
    assert code in (0, 1, 2), (code, text[-2000:])
    assert keep.read_text() == "the user's own file"
    if command not in ("swap-images",):
        assert code == 0, text[-2000:]  # good photos are there: bad ones are skipped and named
        assert "truncated.jpg" in text and "text.png" in text  # ... named


@pytest.mark.parametrize("weights", ["garbage", "truncated", "evil", "empty_folder", "bad_config"])
@pytest.mark.parametrize("command", ["reconstruct", "decode", "eval", "convert", "export", "check-fp16", "score", "stats",
                                     "interpolate", "encode"])
def test_every_weights_command_refuses_broken_weights_in_one_line(command, weights, corpus, tmp_path, capsys, caplog):
    model = str(corpus[weights])
    img = str(corpus["images"] / "good0.png")
    out = tmp_path / "out"
    keep = _guarded(out)
    lat = tmp_path / "lat.safetensors"
    from safetensors.torch import save_file

    save_file({"latents": torch.zeros(1, 4, 4, 4)}, str(lat))
    argv = {
        "reconstruct": ["reconstruct", "--model", model, img, "--out", str(out / "recon")],  # MODEL is optional
        "decode": ["decode", model, str(lat), str(out / "png")],
        "eval": ["eval", model, img, "--output", str(out / "e")],
        "convert": ["convert", model, str(out / "conv"), "--to", "diffusers"],
        "export": ["export", model, str(out / "exp")],
        "check-fp16": ["check-fp16", model, "--no-write"],
        "score": ["score", model, img, "--output", str(out / "s.csv")],
        "stats": ["stats", model, img],
        "interpolate": ["interpolate", model, img, img, "--out", str(out / "strip.png")],
        "encode": ["encode", model, img, str(out / "cache")],
    }[command]
    code, text = _run(argv, capsys, caplog)
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, (code, text[-2000:])
    assert Path(model).name in errors[0]  # names the file or folder
    assert keep.read_text() == "the user's own file"
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # nothing written by a refused command


def test_train_survives_the_image_corpus(corpus, tmp_path, capsys, caplog):
    import yaml

    cfg = {"model": {"block_out_channels": [8, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 32},
           "loss": {"perceptual": "none", "disc_start": 1000},
           "train": {"batch_size": 2, "num_workers": 0, "checkpoint_every": 1000, "max_steps": 2},
           "data": {"crop_size": 32}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, text = _run(["train", str(tmp_path / "c.yaml"), "--data", str(corpus["images"]), "--output", str(tmp_path / "run")],
                      capsys, caplog)
    assert code == 0 and "Traceback" not in text, text[-3000:]
