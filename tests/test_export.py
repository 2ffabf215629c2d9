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
