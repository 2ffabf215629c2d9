"""--family for bare weight files: the published factors, force_upcast, and refusals; the table against the
numbers diffusers itself documents."""

from __future__ import annotations

import json
import logging
import re

import pytest
from safetensors.torch import save_file

import kl_autoencoder as ka
from kl_autoencoder import cli
from kl_autoencoder.model import FAMILIES, latent_normalization


@pytest.fixture
def bare(tmp_path, micro_vae):
    """A diffusers-layout VAE file with no metadata and no config.json beside it: factors unknown."""
    path = tmp_path / "w" / "sdxl_vae.safetensors"
    path.parent.mkdir()
    save_file({k: v.contiguous() for k, v in micro_vae.state_dict().items()}, str(path))
    return path


def test_family_sets_factors_and_force_upcast(bare, micro_vae):
    sdxl = ka.load(bare, family="sdxl")
    assert (sdxl.config.scaling_factor, sdxl.config.shift_factor, sdxl.config.force_upcast) == (0.13025, None, True)
    assert ka.load(bare, family="sdxl-fp16-fix").config.force_upcast is False
    pg = latent_normalization(ka.load(bare, family="playground"))
    assert pg.kind == "per-channel" and pg.scaling_factor == 0.5 and pg.mean == (-1.6574, 1.886, -1.383, 2.5155)
    assert ka.load(bare, family="sd1").config.scaling_factor == 0.18215
    sd = micro_vae.state_dict()
    assert all(ka.load(bare, family="sdxl").state_dict()[k].equal(v) for k, v in sd.items())  # weights untouched


def test_wrong_family_is_refused(bare):
    with pytest.raises(ValueError, match=r"4 latent channels, but --family flux1 is a AutoencoderKL with 16"):
        ka.load(bare, family="flux1")
    with pytest.raises(ValueError, match="family flux2 is a AutoencoderKLFlux2"):
        ka.load(bare, family="flux2")
    with pytest.raises(ValueError, match="choose one of sd1, sd2, sdxl"):
        ka.load(bare, family="sdxl-turbo")


def test_without_family_the_warning_stays(bare, caplog):
    with caplog.at_level(logging.WARNING, logger="kl_autoencoder"):
        vae = ka.load(bare)
    assert vae.config.scaling_factor == 0.18215 and "no scaling_factor stored" in caplog.text and "--family" in caplog.text


def test_cli_encode_and_convert_take_family(bare, tmp_path, photos):
    data = tmp_path / "d"
    data.mkdir()
    photos[0].save(data / "a.png")
    assert cli.main(["encode", str(bare), str(data), str(tmp_path / "c"), "--resolution", "64", "--num-workers", "0",
                     "--family", "sdxl"]) == 0
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["latent_normalization"] == {"kind": "scalar", "scaling_factor": 0.13025, "shift_factor": None}
    assert cli.main(["convert", str(bare), str(tmp_path / "f"), "--to", "diffusers", "--family", "sdxl-fp16-fix"]) == 0
    cfg = json.loads((tmp_path / "f" / "config.json").read_text())
    assert (cfg["scaling_factor"], cfg["force_upcast"]) == (0.13025, False)


def test_table_agrees_with_the_factors_diffusers_documents():
    """diffusers' remote_decode docstring lists "SD v1: 0.18215", "SD XL: 0.13025", "Flux: 0.3611" and shift 0.1159;
    AutoencoderKL's default scaling_factor is SD's. Read from the installed diffusers, not copied here."""
    import inspect

    from diffusers import AutoencoderKL
    from diffusers.utils import remote_utils

    doc = inspect.getsource(remote_utils)
    scaling_doc = re.search(r"scaling_factor \(`float`.*?shift_factor \(`float`", doc, re.S)[0]
    scale = dict(re.findall(r"- (SD v1|SD XL|Flux): ([0-9.]+)", scaling_doc))
    shift = re.search(r"shift_factor \(`float`.*?- Flux: ([0-9.]+)", doc, re.S)[1]
    assert FAMILIES["sd1"].fields["scaling_factor"] == float(scale["SD v1"])
    assert FAMILIES["sdxl"].fields["scaling_factor"] == FAMILIES["sdxl-fp16-fix"].fields["scaling_factor"] == float(scale["SD XL"])
    assert FAMILIES["flux1"].fields["scaling_factor"] == float(scale["Flux"]) and FAMILIES["flux1"].fields["shift_factor"] == float(shift)
    assert FAMILIES["sd2"].fields["scaling_factor"] == inspect.signature(AutoencoderKL).parameters["scaling_factor"].default
    assert all(f.source for f in FAMILIES.values())
