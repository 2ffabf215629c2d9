import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import kl_autoencoder as ka
from kl_autoencoder.cli import build_parser, main


def _subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "kl_autoencoder.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "reconstruct" in r.stdout and "export" in r.stdout


@pytest.mark.parametrize("name", _subcommands())
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert f"kl-autoencoder {name}" in text and len(text) > 200


def test_reconstruct_writes_pairs_and_psnr(micro_vae, photos, tmp_path, capsys):
    ka.export(micro_vae, tmp_path / "model")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    photos[0].crop((0, 0, 61, 50)).save(imgs / "odd.png")  # not a multiple of 8
    photos[1].save(imgs / "b.png")
    (imgs / "broken.png").write_text("not a png")
    code = main(["reconstruct", str(tmp_path / "model"), str(imgs), "--out", str(tmp_path / "out")])
    assert code == 0
    captured = capsys.readouterr()
    assert "broken.png" in captured.err  # named, not fatal
    pair = np.asarray(Image.open(tmp_path / "out" / "odd_reconstruction.png"))
    assert pair.shape == (50, 61 * 2 + 4, 3)
    left, right = pair[:, :61].astype(np.float64), pair[:, 65:].astype(np.float64)
    assert np.array_equal(left, np.asarray(photos[0].crop((0, 0, 61, 50))))
    expected = 10 * np.log10(255**2 / np.mean((left - right) ** 2))  # independent PSNR from the PNG
    line = next(l for l in captured.out.splitlines() if "odd.png" in l)
    assert float(line.split("PSNR ")[1].split(" dB")[0]) == pytest.approx(expected, abs=0.01)
    summary = json.loads((tmp_path / "out" / "psnr.json").read_text())
    assert summary["n_images"] == 2


def test_export_cli_and_errors(micro_vae, tmp_path, capsys):
    ka.export(micro_vae, tmp_path / "model")
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "half"), "--dtype", "fp16"]) == 0
    assert (tmp_path / "half" / "config.json").is_file()
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing" in err  # one line naming the problem
