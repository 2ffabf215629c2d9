"""LDM <-> diffusers conversion: bit-identical round trips, every source layout, strictness, safe unpickling."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import kl_autoencoder as ka
from kl_autoencoder import cli
from kl_autoencoder.convert.weight_files import CheckpointError
from kl_autoencoder.convert import ConversionError, convert_state_dict, infer_groups, load_file, save_ldm, to_ldm_state_dict

from conftest import MICRO, perturb


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


def compvis_vae_keys(channels: list[int], num_res_blocks: int, quant: bool = True, attn: bool = True) -> set[str]:
    """Parameter names of CompVis ldm/modules/diffusionmodules/model.py Encoder/Decoder (attn_resolutions=[]),
    written from that file's structure, independently of the converter's rule table."""
    keys: set[str] = set()

    def res(p: str, cin: int, cout: int) -> None:
        for n in ("norm1", "conv1", "norm2", "conv2") + (("nin_shortcut",) if cin != cout else ()):
            keys.update({f"{p}.{n}.weight", f"{p}.{n}.bias"})

    def mid(p: str) -> None:
        res(f"{p}.mid.block_1", 1, 1)
        res(f"{p}.mid.block_2", 1, 1)
        if attn:
            for n in ("norm", "q", "k", "v", "proj_out"):
                keys.update({f"{p}.mid.attn_1.{n}.weight", f"{p}.mid.attn_1.{n}.bias"})

    n = len(channels)
    for p in ("encoder", "decoder"):
        for n_ in ("conv_in", "norm_out", "conv_out"):
            keys.update({f"{p}.{n_}.weight", f"{p}.{n_}.bias"})
        mid(p)
    cin = channels[0]
    for i, c in enumerate(channels):  # Encoder: down[i] has num_res_blocks blocks, downsample except last
        for j in range(num_res_blocks):
            res(f"encoder.down.{i}.block.{j}", cin, c)
            cin = c
        if i != n - 1:
            keys.update({f"encoder.down.{i}.downsample.conv.weight", f"encoder.down.{i}.downsample.conv.bias"})
    cin = channels[-1]
    for i in reversed(range(n)):  # Decoder: up[i] has num_res_blocks + 1 blocks, upsample except level 0
        for j in range(num_res_blocks + 1):
            res(f"decoder.up.{i}.block.{j}", cin, channels[i])
            cin = channels[i]
        if i != 0:
            keys.update({f"decoder.up.{i}.upsample.conv.weight", f"decoder.up.{i}.upsample.conv.bias"})
    if quant:
        keys.update({"quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight", "post_quant_conv.bias"})
    return keys


@pytest.mark.parametrize("preset", ["sd-kl-f8", "kl-f8c16"])
def test_full_size_round_trip_is_bit_identical(preset):
    vae = ka.create(preset)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # init leaves GroupNorm affines at 1/0: make every vector distinct (convs already are)
        for p in vae.parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g))
    sd = vae.state_dict()
    ldm = to_ldm_state_dict(vae)
    c = vae.config
    assert set(ldm) == compvis_vae_keys(list(c.block_out_channels), c.layers_per_block, quant=c.use_quant_conv)
    assert ldm["decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)  # attention as 1x1 conv
    # diffusers up_blocks[0] (the deepest) is LDM up[3]
    assert torch.equal(ldm["decoder.up.3.block.0.conv1.weight"], sd["decoder.up_blocks.0.resnets.0.conv1.weight"])
    back, config = convert_state_dict(ldm, {"scaling_factor": c.scaling_factor, "shift_factor": c.shift_factor})
    assert_same_weights(sd, back)
    for k in ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups", "use_quant_conv", "mid_block_add_attention"):
        assert tuple(config[k]) == tuple(c[k]) if isinstance(c[k], (list, tuple)) else config[k] == c[k], k


def test_tiny_and_c16_file_round_trip(tmp_path, micro_vae_c16):
    for name, vae in [("tiny", perturb(ka.create("tiny-kl-f8"))), ("c16", micro_vae_c16)]:
        path = ka.export(vae, tmp_path / f"{name}.safetensors", format="ldm", allow_nonstandard=True)  # not SD-sized
        assert path == tmp_path / f"{name}.safetensors"
        back = ka.load(path)
        assert_same_weights(vae.state_dict(), back.state_dict())
        for k in ("scaling_factor", "shift_factor", "norm_num_groups", "latent_channels", "use_quant_conv", "force_upcast"):
            assert back.config[k] == vae.config[k], (name, k)
    x = torch.rand(1, 3, 32, 32) * 2 - 1  # the c16 model (shift factor, no quant convs) behaves identically
    torch.testing.assert_close(ka.reconstruct(back, x, tiling="never"), ka.reconstruct(vae, x, tiling="never"), rtol=0, atol=0)


def test_diffusers_own_converter_reads_our_ldm_file(tmp_path, micro_vae):
    """diffusers' single-file converter (an independent implementation) agrees with our LDM layout."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    path = save_ldm(micro_vae, tmp_path / "vae.safetensors", dtype="fp32", allow_nonstandard=True)
    with safe_open(str(path), "pt") as f:
        ldm = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    assert float(meta["scaling_factor"]) == micro_vae.config.scaling_factor
    assert json.loads(meta["kl_autoencoder.config"])["norm_num_groups"] == 8
    theirs = convert_ldm_vae_checkpoint(ldm, dict(micro_vae.config))
    assert_same_weights(micro_vae.state_dict(), theirs)


def test_ldm_file_full_sd_checkpoint_and_vae_prefix_load_the_same(tmp_path, micro_vae):
    ldm = to_ldm_state_dict(micro_vae)
    plain = tmp_path / "vae-ldm.safetensors"
    save_file({k: v.contiguous() for k, v in ldm.items()}, str(plain), metadata={"scaling_factor": "0.5"})
    fake_unet = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(32, 4, 3, 3),
        "model.diffusion_model.out.2.bias": torch.randn(4),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.randn(32),
    }
    full = {**fake_unet, **{"first_stage_model." + k: v for k, v in ldm.items()}}
    ckpt = tmp_path / "sd-full.ckpt"
    torch.save({"state_dict": full, "global_step": 1234, "epoch": 3}, ckpt)  # Lightning-style wrapper
    prefixed = tmp_path / "vae-prefixed.safetensors"
    save_file({"vae." + k: v.contiguous() for k, v in micro_vae.state_dict().items()}, str(prefixed))
    want = micro_vae.state_dict()
    for path in (plain, ckpt, prefixed):
        vae = load_file(path, scaling_factor=0.5)
        assert_same_weights(want, vae.state_dict())
        assert vae.config.norm_num_groups == 8 and vae.config.scaling_factor == 0.5


def test_legacy_diffusers_names_load(tmp_path, micro_vae):
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in micro_vae.state_dict().items():
        for new, old in legacy.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        sd[k] = v
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in sd
    path = tmp_path / "legacy.bin"
    torch.save(sd, path)
    assert_same_weights(micro_vae.state_dict(), load_file(path).state_dict())


def test_scaling_factor_metadata_and_default(tmp_path, micro_vae, caplog):
    path = save_ldm(micro_vae, tmp_path / "m.safetensors", allow_nonstandard=True)
    assert load_file(path).config.scaling_factor == 0.5
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in micro_vae.state_dict().items()}, str(bare))
    with caplog.at_level(logging.WARNING, logger="kl_autoencoder"):
        vae = load_file(bare)
    assert vae.config.scaling_factor == 0.18215 and "no scaling_factor" in caplog.text


def test_missing_unmapped_and_misshapen_keys_fail_naming_them(tmp_path, micro_vae):
    ldm = {k: v.contiguous() for k, v in to_ldm_state_dict(micro_vae).items()}
    broken = dict(ldm)
    del broken["decoder.up.2.block.1.conv2.weight"]
    broken["encoder.down.0.attn.0.q.weight"] = torch.zeros(8, 8, 1, 1)  # attention inside a level: not an SD VAE
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ConversionError) as e:
        load_file(tmp_path / "broken.safetensors")
    msg = str(e.value)
    assert "broken.safetensors" in msg and "1 missing key(s): decoder.up.2.block.1.conv2.weight" in msg
    assert "1 unmapped key(s): encoder.down.0.attn.0.q.weight" in msg
    wrong = dict(ldm)
    wrong["post_quant_conv.weight"] = torch.zeros(4, 4, 3, 3)
    with pytest.raises(ConversionError, match=r"post_quant_conv.weight \(4, 4, 3, 3\) != \(4, 4, 1, 1\)"):
        convert_state_dict(wrong)


def test_pickle_that_runs_code_is_refused(tmp_path, micro_vae):
    marker = tmp_path / "MARKER"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": to_ldm_state_dict(micro_vae), "callback": Evil()}, path)
    with pytest.raises(CheckpointError, match=r"evil.ckpt: refused: .*system"):
        ka.load(path)
    rc = cli.main(["convert", str(path), str(tmp_path / "out.safetensors"), "--to", "ldm"])
    assert rc == 2 and not (tmp_path / "out.safetensors").exists()
    assert not marker.exists()


def test_groups_inference():
    assert infer_groups([128, 256, 512, 512]) == 32
    assert infer_groups([8, 16, 32, 32]) == 8
    assert infer_groups([48, 96]) == 16


def test_cli_convert_both_ways(tmp_path, micro_vae, capsys):
    vae = ka.create(dataclasses.replace(MICRO, shift_factor=0.25))
    src = ka.export(perturb(vae), tmp_path / "diffusers")
    assert cli.main(["convert", str(src), str(tmp_path / "v.safetensors"), "--to", "ldm", "--dtype", "fp16", "--allow-nonstandard"]) == 0
    with safe_open(str(tmp_path / "v.safetensors"), "pt") as f:
        assert f.get_tensor("decoder.conv_out.weight").dtype == torch.float16
        assert float(f.metadata()["shift_factor"]) == 0.25
    assert cli.main(["convert", str(tmp_path / "v.safetensors"), str(tmp_path / "back"), "--to", "diffusers"]) == 0
    back = ka.load(tmp_path / "back")
    assert next(back.parameters()).dtype == torch.float32  # diffusers folders load as fp32 ...
    assert back.config.shift_factor == 0.25 and back.config.norm_num_groups == 8
    half = {k: v.half().float() for k, v in ka.load(src).state_dict().items()}  # ... holding the fp16 values
    assert_same_weights(half, back.state_dict())
    assert "-> " in capsys.readouterr().out


def test_diffusers_weights_file_reads_config_beside_it(tmp_path):
    vae = perturb(ka.create(dataclasses.replace(MICRO, shift_factor=0.25, scaling_factor=0.7, act_fn="silu")))
    folder = ka.export(vae, tmp_path / "d")
    back = ka.load(folder / "diffusion_pytorch_model.safetensors")  # a single file: architecture from shapes
    assert (back.config.scaling_factor, back.config.shift_factor, back.config.norm_num_groups) == (0.7, 0.25, 8)
    assert_same_weights(vae.state_dict(), back.state_dict())
