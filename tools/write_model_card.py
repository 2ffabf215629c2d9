"""Write the shipped model's card (README.md) from its run directory and its eval/stats outputs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", nargs="+", required=True,
                    help="the training phases' run directories in order (status.json, config.yaml); each later "
                    "phase started from the previous one's export")
    ap.add_argument("--model", required=True, help="the shipped diffusers folder (with eval-kodak/metrics.json)")
    ap.add_argument("--notes", default="tools/model_card_notes.md", help="hand-written section: what was tried")
    a = ap.parse_args()
    model = Path(a.model)
    phases = [(json.loads((Path(r) / "status.json").read_text()), yaml.safe_load((Path(r) / "config.yaml").read_text()))
              for r in a.runs]
    status, cfg = phases[-1]
    steps = sum(s["step"] for s, _ in phases)
    images = sum(s["images_seen"] for s, _ in phases)
    hours = sum(s.get("wall_time_s", 0) for s, _ in phases) / 3600
    m = json.loads((model / "eval-kodak" / "metrics.json").read_text())
    c = json.loads((model / "config.json").read_text())
    from safetensors import safe_open

    with safe_open(str(model / "diffusion_pytorch_model.safetensors"), "pt") as f:
        n_params = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())
    t, lo, d = cfg["train"], cfg["loss"], cfg["data"]
    losses = ", ".join(f"phase {i} {pc['loss']['reconstruction'].upper()}" for i, (_, pc) in enumerate(phases, 1))
    optim = "; ".join(
        f"phase {i}: Adam {pc['train']['lr']:g} {pc['train']['lr_schedule']}"
        f"{' to 0' if pc['train']['lr_schedule'] == 'cosine' else ''}, batch {pc['train']['batch_size']} of "
        f"{pc['data']['crop_size']}px crops, {ps['step']:,} steps / {ps['images_seen']:,} images"
        for i, (ps, pc) in enumerate(phases, 1)
    )
    below = m["psnr"] < m["psnr_bicubic_f8"]
    verdict = (
        "**Its Kodak PSNR is still below the bicubic-by-8 baseline**: it needs more training, which "
        "`tools/train_shipped_model.sh` continues."
        if below
        else f"Its Kodak PSNR is {m['psnr'] - m['psnr_bicubic_f8']:+.2f} dB against the bicubic-by-8 baseline "
        f"and {m['psnr'] - m['psnr_bicubic_f4']:+.2f} dB against bicubic-by-4."
    )
    notes = Path(a.notes).read_text() if Path(a.notes).is_file() else ""
    text = f"""# kl-f8c4-bsds-cpu

The default model of kl-autoencoder: a small Stable-Diffusion-layout KL autoencoder (diffusers
`AutoencoderKL`, f8c4: 4 latent channels at 1/8 of the image size) trained on a 2-core CPU.
It is a demonstration-grade VAE, not a replacement for SD's: use it to see the whole pipeline work
offline, and train your own with `kl-autoencoder train` for real work. {verdict}

| | |
|---|---|
| parameters | {n_params:,} |
| block_out_channels | {c['block_out_channels']}, {c['layers_per_block']} resnet per block, mid-block attention, quant convs |
| latent | {c['latent_channels']} channels at 1/8 size |
| scaling_factor | {c['scaling_factor']:.5f} (1/std of posterior samples on BSDS500 val at 256px, `kl-autoencoder stats`) |
| shift_factor | {c.get('shift_factor')} |
| weights | fp16 safetensors |
| training data | BSDS500 train + test (400 photos, 481x321); validation: BSDS500 val. BSDS500 is offered for non-commercial research and education: these weights inherit that. Never trained on Kodak. |
| loss | {losses}, + KL (weight {lo['kl_weight']:g}, LDM's sum-over-pixels form) with posterior sampling; no LPIPS (the VGG16 ImageNet weights it needs cannot be obtained offline here); no GAN (it trades PSNR for texture) |
| optimisation | {optim}; betas {t['betas']}; random crops at native resolution with flips; EMA {t['ema_decay']} (exported) |
| steps / images seen | {steps:,} steps / {images:,} images |
| wall time | {hours:.2f} h on 2 shared CPU cores, niced (`tools/train_shipped_model.sh`) |
| last training loss | {lo['reconstruction'].upper()} {status['losses'].get('rec', float('nan')):.4f} per pixel (images in [-1, 1]), KL {status['losses'].get('kl', float('nan')):.0f} per image |
| validation (BSDS500 val, {d['val_images']} centre crops of {d['crop_size']}px) | PSNR {status['validation'].get('psnr', float('nan')):.2f} dB at step {status['validation'].get('step')} |

## Kodak (24 images, full size, `kl-autoencoder eval`)

| | PSNR (dB) | SSIM |
|---|---|---|
| this model | {m['psnr']:.2f} | {m['ssim']:.4f} |
| bicubic down/up by 8 (1/64 of the values; the latent keeps 1/48) | {m['psnr_bicubic_f8']:.2f} | {m.get('ssim_bicubic_f8', float('nan')):.4f} |
| bicubic down/up by 4 (1/16 of the values) | {m['psnr_bicubic_f4']:.2f} | {m.get('ssim_bicubic_f4', float('nan')):.4f} |
| JPEG quality 90 | {m.get('jpeg90_psnr', float('nan')):.2f} | |

Latent size: {m.get('latent_bpp_fp16', float('nan')):.2f} bits per pixel at fp16 (PNG: {m.get('png_bpp', float('nan')):.2f}, JPEG-90: {m.get('jpeg90_bpp', float('nan')):.2f}).
Full report: `eval-kodak/metrics.md`. Reproduce every figure with `tools/ship_model.sh` after
`tools/train_shipped_model.sh` (which resumes; its config is `configs/kl-f8c4-cpu.yaml`).

## Use

```python
from diffusers import AutoencoderKL
vae = AutoencoderKL.from_pretrained("weights/kl-f8c4-bsds-cpu")
latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor   # images in [-1, 1]
images = vae.decode(latents / vae.config.scaling_factor).sample
```

{notes}
"""
    (model / "README.md").write_text(text)
    print(f"wrote {model / 'README.md'}")


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


if __name__ == "__main__":
    main()
