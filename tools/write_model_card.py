"""Write the shipped model's card (README.md) from its run directories and its eval/stats/demo/colour outputs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

# Phases 1-3 trained the earlier default, kl-f8c4-bsds-cpu (norm_num_groups 32), whose fp16 weights phase 4 starts
# from. Their run directories are not kept; these figures are from that model's card (git f612551).
EARLIER = {
    "name": "kl-f8c4-bsds-cpu",
    "steps": 9764,
    "images": 51412,
    "hours": 3.38,
    "optim": "phase 1: Adam 4e-4 constant, L1, batch 8 of 96px crops, 5,314 steps; phase 2: Adam 1.5e-4 cosine to 0, "
    "L2, batch 2 of 256px crops, 850 steps; phase 3: Adam 2e-4 cosine to 0, L2, batch 2 of 320px crops, 3,600 steps "
    "(BSDS500 only, 32 groups)",
    "kodak_psnr": 23.92,
    "kodak_ssim": 0.6649,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", nargs="+", required=True,
                    help="the training phases' run directories after the earlier default, in order (status.json, config.yaml); "
                    "each started from the previous one's export")
    ap.add_argument("--model", required=True,
                    help="the shipped diffusers folder (with eval-kodak/, eval-bsds-val/, eval-demo/, eval-colour.json)")
    ap.add_argument("--notes", default="tools/model_card_notes.md", help="hand-written section: what was tried")
    a = ap.parse_args()
    model = Path(a.model)
    phases = [(json.loads((Path(r) / "status.json").read_text()), yaml.safe_load((Path(r) / "config.yaml").read_text()))
              for r in a.runs]
    status, cfg = phases[-1]
    steps = EARLIER["steps"] + sum(s["step"] for s, _ in phases)
    images = EARLIER["images"] + sum(s["images_seen"] for s, _ in phases)
    hours_new = sum(s.get("wall_time_s", 0) for s, _ in phases) / 3600
    m = json.loads((model / "eval-kodak" / "metrics.json").read_text())
    v = json.loads((model / "eval-bsds-val" / "metrics.json").read_text())
    demo = json.loads((model / "eval-demo" / "demo.json").read_text())
    colour = json.loads((model / "eval-colour.json").read_text())
    c = json.loads((model / "config.json").read_text())
    from safetensors import safe_open

    with safe_open(str(model / "diffusion_pytorch_model.safetensors"), "pt") as f:
        n_params = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())
    size_mb = (model / "diffusion_pytorch_model.safetensors").stat().st_size / 2**20
    lo, d = cfg["loss"], cfg["data"]

    def world(ps: dict, pc: dict) -> int:
        return max(1, round(ps["images_seen"] / max(1, ps["step"]) / pc["train"]["batch_size"]))

    optim = "; ".join(
        f"phase {i}: Adam {pc['train']['lr']:g} {pc['train']['lr_schedule']}"
        f"{' to 0' if pc['train']['lr_schedule'] == 'cosine' else ''}, {pc['loss']['reconstruction'].upper()}"
        f"{_colour(pc['loss'])}, "
        f"batch {pc['train']['batch_size'] * world(ps, pc)} of {_crops(pc['data'])} crops, {ps['step']:,} steps / "
        f"{ps['images_seen']:,} images, {ps.get('wall_time_s', 0) / 3600:.2f} h"
        for i, (ps, pc) in enumerate(phases, 4)
    )
    verdict = (f"Kodak: {m['psnr']:.2f} dB, {m['psnr'] - m['psnr_bicubic_f8']:+.2f} dB against the bicubic-by-8 baseline and "
               f"{m['psnr'] - m['psnr_bicubic_f4']:+.2f} dB against bicubic-by-4 (the earlier default, "
               f"{EARLIER['name']}: {EARLIER['kodak_psnr']:.2f} dB).")
    demo_rows = "\n".join(
        f"| {r['image']} | {r['psnr']:.2f} | {r['psnr_bicubic_f8']:.2f} | {_row(colour['demo-256'], r['image'])} |"
        for r in demo["images"])
    cs = {k: colour[k]["summary"] for k in colour}
    last = 3 + len(phases)
    flat = ", ".join(f"{r['image'].replace('@', ' ')} px {r['psnr']:.1f}" for r in colour["flat"]["rows"])
    notes = Path(a.notes).read_text() if Path(a.notes).is_file() else ""
    text = f"""# kl-f8c4-bsds-urban-cpu

The default model of kl-autoencoder: a small Stable-Diffusion-layout KL autoencoder (diffusers
`AutoencoderKL`, f8c4: 4 latent channels at 1/8 of the image size) trained on a 2-core CPU.
**Good for** seeing the whole latent pipeline (encode, store, decode, diffusers pipelines, anomaly scores) work offline
on a laptop, with photos reconstructed above bicubic-by-8 and their mean colours within about 2 levels of 255; **not good for**
real latent-diffusion training, fine texture (Kodak PSNR below bicubic-by-4) or large flat saturated colours (a solid
red or green comes back tinted): train your own with `kl-autoencoder train` or use SD's VAE for that. {verdict}

| | |
|---|---|
| parameters | {n_params:,} ({size_mb:.1f} MB of fp16 safetensors) |
| block_out_channels | {c['block_out_channels']}, {c['layers_per_block']} resnet per block, mid-block attention, quant convs |
| norm_num_groups | {c['norm_num_groups']} (4 channels per group at the 32-channel layers; the earlier default had 32, i.e. per-channel InstanceNorm there, which caused its colour cast) |
| latent | {c['latent_channels']} channels at 1/8 size |
| scaling_factor | {c['scaling_factor']:.5f} (1/std of posterior samples on BSDS500 val at 256px, `kl-autoencoder stats`) |
| shift_factor | {c.get('shift_factor')} |
| training data | BSDS500 train + test (400 photos, 481x321) and, from phase 5, Urban100 (100 city photos, about 1024x768); from phase 6, colour-jittered copies of the BSDS500 training photos and 24 flat colours (`tools/make_colour_jitter.py`); validation: BSDS500 val. BSDS500 and Urban100 are offered for research and education: these weights inherit that. Never trained on Kodak or BSDS500 val. |
| loss | L1 then L2 (phases 2-{last}), + KL (weight {lo['kl_weight']:g}, LDM's sum-over-pixels form) with posterior sampling; no LPIPS (the VGG16 ImageNet weights it needs cannot be obtained offline here); no GAN (it trades PSNR for texture) |
| optimisation | phases 1-3 (the earlier default): {EARLIER['optim']}; {optim}; betas {cfg['train']['betas']}; random crops at native resolution with flips; EMA {cfg['train']['ema_decay']} ({_exported(cfg['train'], last)}) |
| steps / images seen | {steps:,} steps / {images:,} images in all |
| wall time | {EARLIER['hours'] + hours_new:.2f} h on 2 shared CPU cores, niced ({EARLIER['hours']:.2f} h for phases 1-3, {hours_new:.2f} h for phases 4-{last}; `tools/train_shipped_model.sh`) |
| last training loss | {lo['reconstruction'].upper()} {status['losses'].get('rec', float('nan')):.4f} per pixel (images in [-1, 1], one batch), KL {status['losses'].get('kl', float('nan')):.0f} per image |
| validation during training (BSDS500 val, {d['val_images']} centre crops of {d['crop_size']}px) | PSNR {status['validation'].get('psnr', float('nan')):.2f} dB at step {status['validation'].get('step')} of phase {last} |

## Kodak (24 images, full size, `kl-autoencoder eval`)

| | PSNR (dB) | SSIM |
|---|---|---|
| this model | {m['psnr']:.2f} | {m['ssim']:.4f} |
| the earlier default ({EARLIER['name']}) | {EARLIER['kodak_psnr']:.2f} | {EARLIER['kodak_ssim']:.4f} |
| bicubic down/up by 8 (1/64 of the values; the latent keeps 1/48) | {m['psnr_bicubic_f8']:.2f} | {m.get('ssim_bicubic_f8', float('nan')):.4f} |
| bicubic down/up by 4 (1/16 of the values) | {m['psnr_bicubic_f4']:.2f} | {m.get('ssim_bicubic_f4', float('nan')):.4f} |
| JPEG quality 90 | {m.get('jpeg90_psnr', float('nan')):.2f} | |

Latent size: {m.get('latent_bpp_fp16', float('nan')):.2f} bits per pixel at fp16 (PNG: {m.get('png_bpp', float('nan')):.2f}, JPEG-90: {m.get('jpeg90_bpp', float('nan')):.2f}).
Full report: `eval-kodak/metrics.md`.

## BSDS500 val (100 images, never trained on; full images centre-cropped to a multiple of 8)

| | PSNR (dB) | SSIM |
|---|---|---|
| this model | {v['psnr']:.2f} | {v['ssim']:.4f} |
| bicubic down/up by 8 | {v['psnr_bicubic_f8']:.2f} | {v.get('ssim_bicubic_f8', float('nan')):.4f} |
| bicubic down/up by 4 | {v['psnr_bicubic_f4']:.2f} | {v.get('ssim_bicubic_f4', float('nan')):.4f} |

{v['psnr'] - v['psnr_bicubic_f8']:+.2f} dB against bicubic-by-8. Report: `eval-bsds-val/metrics.md`.

## Demo photos (`kl-autoencoder demo`: short side resized to 256, centre crop) and colour

| photo | PSNR (dB) | bicubic-by-8 (dB) | per-channel mean error R, G, B (levels of 255) |
|---|---|---|---|
{demo_rows}

Colour (`tools/colour_check.py`, plain diffusers; mean of each channel of the reconstruction minus the original's,
levels of 255; file `eval-colour.json`):

| images | largest per-channel mean error | average signed error R, G, B |
|---|---|---|
| demo photos at 256 px (4) | {cs['demo-256']['max_abs_mean_error']:.2f} | {_fmt(cs['demo-256']['mean_signed_error'])} |
| Kodak, full images (24) | {cs['kodak']['max_abs_mean_error']:.2f} | {_fmt(cs['kodak']['mean_signed_error'])} |
| 128 px crops (the demo photos at 128 px + the centre 128 px of each Kodak image: {cs['crops-128']['n']}) | {cs['crops-128']['max_abs_mean_error']:.2f} | {_fmt(cs['crops-128']['mean_signed_error'])} |
| flat colours, 64 and 256 px (12) | {cs['flat']['max_abs_mean_error']:.2f} | {_fmt(cs['flat']['mean_signed_error'])} |

Flat solid-colour images, PSNR (dB): {flat}.
`tests/test_shipped_colour.py` checks these with plain diffusers on every test run (Kodak part: `pytest -m slow`).
Reproduce every figure with `tools/ship_model.sh` after `tools/train_shipped_model.sh` (which resumes; its
config is `configs/kl-f8c4-cpu.yaml` with the overrides in the script).

## Use

```python
from diffusers import AutoencoderKL
vae = AutoencoderKL.from_pretrained("weights/kl-f8c4-bsds-urban-cpu")
latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor   # images in [-1, 1]
images = vae.decode(latents / vae.config.scaling_factor).sample
```

{notes}
"""
    (model / "README.md").write_text(text)
    print(f"wrote {model / 'README.md'}")


def _exported(t: dict, last: int) -> str:
    """Which weights the last phase exported (train.export_ema; configs from before the key: the EMA)."""
    if t.get("export_ema", True):
        return "exported; each phase starts from the previous one's export"
    return (f"phases 1-{last - 1} exported it, each phase starting from the previous one's export; phase {last}'s export "
            "holds the live weights at the end of its schedule (train.export_ema=false; why: tools/model_card_notes.md)")

def _crops(data: dict) -> str:
    sizes = data.get("crop_sizes")
    return "/".join(map(str, sizes)) + "px (one size per batch)" if sizes else f"{data['crop_size']}px"


def _colour(loss: dict) -> str:
    w = loss.get("colour_weight") or 0
    return f" + mean colour x{w:g}" if w else ""


def _row(block: dict, name: str) -> str:
    for r in block["rows"]:
        if r["image"] == name:
            return _fmt(r["mean_error"])
    return "n/a"


def _fmt(values) -> str:
    return ", ".join(f"{x:+.1f}" for x in values)


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


if __name__ == "__main__":
    main()
