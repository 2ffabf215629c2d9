"""Exported folders load in plain diffusers (no kl_autoencoder import) and agree with our decode."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import kl_autoencoder as ka

DIFFUSERS_ONLY = textwrap.dedent(
    """
    import sys, torch
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file, save_file
    folder, tensors = sys.argv[1], sys.argv[2]
    vae = AutoencoderKL.from_pretrained(folder, local_files_only=True)
    t = load_file(tensors)
    shift = vae.config.shift_factor or 0.0
    with torch.no_grad():
        img = vae.decode(t["latents"] / vae.config.scaling_factor + shift).sample
    save_file({"images": img.contiguous()}, tensors + ".out")
    assert "kl_autoencoder" not in sys.modules
    print("scaling", vae.config.scaling_factor, "shift", vae.config.shift_factor)
    """
)


@pytest.mark.parametrize("fixture", ["micro_vae", "micro_vae_c16"])
def test_plain_diffusers_decodes_our_latents(fixture, request, tmp_path, photos):
    vae = request.getfixturevalue(fixture)
    out = ka.export(vae, tmp_path / "vae", notes="test export")
    latents = ka.encode(vae, photos[:2])  # normalised
    ours = ka.decode(vae, latents)
    save_file({"latents": latents.contiguous()}, str(tmp_path / "lat.safetensors"))
    script = tmp_path / "plain.py"
    script.write_text(DIFFUSERS_ONLY)
    r = subprocess.run([sys.executable, str(script), str(out), str(tmp_path / "lat.safetensors")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    theirs = load_file(str(tmp_path / "lat.safetensors.out"))["images"]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_export_folder_contents_and_dtypes(micro_vae_c16, tmp_path):
    out = ka.export(micro_vae_c16, tmp_path / "half", dtype="fp16")
    assert {p.name for p in out.iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors", "README.md"}
    weights = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert all(t.dtype == torch.float16 for t in weights.values())
    for name, t in micro_vae_c16.state_dict().items():  # same weights, rounded to fp16
        torch.testing.assert_close(weights[name], t.half())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["scaling_factor"] == 1.5 and cfg["shift_factor"] == 0.1 and cfg["latent_channels"] == 16
    card = (out / "README.md").read_text()
    assert "1.5" in card and "0.1" in card and "fp16" in card
    assert next(micro_vae_c16.parameters()).dtype == torch.float32  # the model itself is untouched
    with pytest.raises(ValueError, match="dtype"):
        ka.export(micro_vae_c16, tmp_path / "x", dtype="fp8")


def test_load_round_trip(micro_vae, tmp_path):
    ka.export(micro_vae, tmp_path / "m")
    back = ka.load(tmp_path / "m")
    for name, t in micro_vae.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    with pytest.raises(FileNotFoundError, match="no such model"):
        ka.load(tmp_path / "nope")


# ----------------------------------------------------------------------------- honest LDM export (issue 16)


def _comfy_layout_load(vae: torch.nn.Module) -> RuntimeError | None:
    """What ComfyUI / AUTOMATIC1111 do with our LDM tensors: build SD's fixed first stage (here: the sd-kl-f8
    preset, shapes only) and load them into it; diffusers' own LDM converter maps the keys. The error, or None."""
    import warnings

    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from kl_autoencoder.convert import to_ldm_state_dict

    kwargs = ka.load_config("sd-kl-f8").model.diffusers_kwargs()
    kwargs["latent_channels"] = vae.config.latent_channels  # the one thing they read from the file
    with torch.device("meta"):
        target = AutoencoderKL(**kwargs)
    sd = convert_ldm_vae_checkpoint(to_ldm_state_dict(vae), dict(target.config))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            target.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:
        return e
    return None


def _cli(args: list[str], capsys) -> tuple[int, str]:
    from kl_autoencoder import cli

    rc = cli.main(args)
    return rc, capsys.readouterr().err


def test_ldm_export_refuses_the_shipped_model_with_the_reason(tmp_path, capsys):
    """Must-show 4: the shipped model (tiny-kl-f8 layout) is refused; forced, its file is what ComfyUI rejects."""
    from kl_autoencoder.model import default_model_path

    try:
        shipped = default_model_path()
    except FileNotFoundError:
        pytest.skip("no shipped model in this install")
    out = tmp_path / "shipped.safetensors"
    rc, err = _cli(["export", str(shipped), str(out), "--format", "ldm"], capsys)
    assert rc == 2 and not out.exists()
    line = err.strip()
    assert "\n" not in line and line.startswith("error: refusing to write")
    assert "block_out_channels [32, 64, 128, 128] (they build [128, 256, 512, 512])" in line
    assert "layers_per_block 1 (they build 2)" in line and "--allow-nonstandard" in line and "from_single_file(path, config=FOLDER)" in line
    err_load = _comfy_layout_load(ka.load(shipped))  # the reason is real: size mismatches in SD's layout
    assert err_load is not None and str(err_load).count("size mismatch") > 100
    rc, err = _cli(["export", str(shipped), str(out), "--format", "ldm", "--force"], capsys)
    assert rc == 2 and not out.exists() and "--allow-nonstandard" in err  # --force only replaces outputs
    rc, _ = _cli(["export", str(shipped), str(out), "--format", "ldm", "--allow-nonstandard"], capsys)
    assert rc == 0 and out.is_file()
    rc, err = _cli(["export", str(shipped), str(out), "--format", "ldm", "--allow-nonstandard"], capsys)
    assert rc == 2 and "exists" in err  # ... and --allow-nonstandard does not replace one


def test_ldm_export_refuses_the_16_group_sd_model_that_would_load_silently(tmp_path, capsys):
    """Must-show 4: SD-sized with norm_num_groups 16 (a YAML path as MODEL): refused, because ComfyUI's SD
    layout (32 groups) takes its weights without complaint and decodes garbage."""
    yaml_path = tmp_path / "sd16.yaml"
    yaml_path.write_text("model:\n  norm_num_groups: 16\n")  # else the SD 1.x/2.x architecture
    rc, err = _cli(["export", str(yaml_path), str(tmp_path / "g16.safetensors"), "--format", "ldm"], capsys)
    assert rc == 2 and not (tmp_path / "g16.safetensors").exists()
    assert "norm_num_groups 16 (they build 32; not in the weights, so it would load silently and decode wrong images)" in err
    assert _comfy_layout_load(ka.create(yaml_path)) is None  # indeed: no error at all in SD's layout


def test_sd_layouts_pass_and_round_trip_bit_identically(tmp_path):
    """Must-show 4: SD 1.x/2.x (4 channels, quant convs) and SD3/FLUX.1 (16, none) export without --force,
    load in SD's layout, and come back bit-identical."""
    from kl_autoencoder.convert import ldm_layout_problems

    assert ldm_layout_problems(ka.create("kl-f8c16")) == []
    vae = ka.create("sd-kl-f8")
    with torch.no_grad():
        for p in vae.parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    assert ldm_layout_problems(vae) == [] and _comfy_layout_load(vae) is None
    path = ka.export(vae, tmp_path / "sd.safetensors", format="ldm")
    back = ka.load(path)
    a, b = vae.state_dict(), back.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_exported_files_are_0644_under_umask_022(tmp_path, micro_vae):
    """Must-show 4: diffusers folder files and LDM files are 0666 & ~umask (safetensors alone writes 0600)."""
    import os

    old = os.umask(0o022)
    try:
        folder = ka.export(micro_vae, tmp_path / "d")
        ldm = ka.export(micro_vae, tmp_path / "l.safetensors", format="ldm", allow_nonstandard=True)
        os.umask(0o002)
        group = ka.export(micro_vae, tmp_path / "g.safetensors", format="ldm", allow_nonstandard=True)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes == {"config.json": 0o644, "diffusion_pytorch_model.safetensors": 0o644, "README.md": 0o644}
    assert ldm.stat().st_mode & 0o777 == 0o644 and group.stat().st_mode & 0o777 == 0o664


def test_yaml_path_is_a_model_for_export(tmp_path):
    from kl_autoencoder import cli
    from kl_autoencoder.config import presets

    yaml_path = tmp_path / "mine.yaml"
    yaml_path.write_text((presets.configs_dir() / "tiny-kl-f8.yaml").read_text())
    assert cli.main(["export", str(yaml_path), str(tmp_path / "out")]) == 0
    assert tuple(ka.load(tmp_path / "out").config.block_out_channels) == (32, 64, 128, 128)
