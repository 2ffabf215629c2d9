"""`kl-autoencoder encode` / `decode`: latent caches for diffusion training and back to images.

The encode job itself is ``latent_cache.encode_dataset``; reading a cache is ``latent_dataset``.
Decoding accepts three kinds of LATENTS:
  * an encode output folder or one of its shards: the stored posterior means, raw latents;
  * a .safetensors / .pt file with one tensor (or a ``latents`` entry), (B, C, h, w) or (C, h, w):
    normalised latents ``(z - shift) * scale`` (what a diffusion model samples), or raw with ``--raw``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Iterator

import torch

from . import api
from .latent_cache import FORMAT, encode_dataset, shard_header
from .latent_dataset import LatentDataset

Named = tuple[str, torch.Tensor]  # (output name without suffix, (C, h, w) latents)


def _tensor_file(path: Path) -> torch.Tensor:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path))
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    if isinstance(obj, dict):
        if "latents" in obj:
            obj = obj["latents"]
        elif len(obj) == 1:
            obj = next(iter(obj.values()))
        else:
            raise ValueError(f"{path}: holds {len(obj)} entries ({', '.join(list(obj)[:5])}); save one tensor, or name it 'latents'")
    if not isinstance(obj, torch.Tensor):
        raise TypeError(f"{path}: expected a tensor, found {type(obj).__name__}")
    return obj


def read_latents(path: str | Path) -> tuple[list[Named], bool]:
    """LATENTS -> ([(name, latents (C, h, w))], is_raw_cache). Names follow the sources (or the index)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such latent file or folder")
    if path.is_dir() or (path.suffix == ".safetensors" and shard_header(path).get("format") == FORMAT):
        if path.is_dir():
            ds = LatentDataset(path)
            items = [(s["path"], ds.moments(i)[0]) for i, s in enumerate(ds.samples)]
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                samples = json.loads(f.metadata()["samples"])
                items = [(s["path"], f.get_tensor(f"{s['key']}.mean").float()) for s in samples]
        return _png_names(items), True
    t = _tensor_file(path)
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise ValueError(f"{path}: expected latents shaped (B, C, h, w) or (C, h, w), got {tuple(t.shape)}")
    return [(f"{i:05d}", t[i]) for i in range(t.shape[0])], False


def _png_names(items: list[Named]) -> list[Named]:
    """Source paths -> output names: ``dir/cat.jpg`` -> ``dir/cat``; on a clash keep the suffix (``cat.jpg``)."""
    stems = [str(Path(p).with_suffix("")) if p else "image" for p, _ in items]
    clash = {s for s in stems if stems.count(s) > 1}
    return [((p or "image") if s in clash else s, t) for s, (p, t) in zip(stems, items)]


@torch.no_grad()
def decode_latents(vae: torch.nn.Module, latents: torch.Tensor, *, raw: bool = False, tiling: str = "auto",
                   tile_size: int | None = None) -> torch.Tensor:
    """Latents (B, C, h, w), normalised (or raw) -> images (B, 3, 8h, 8w) in [-1, 1] (clamped)."""
    latents = api.check_latents(vae, latents).float()
    if raw:
        latents = api.normalize_latents(vae, latents)
    return api.decode(vae, latents, tiling=tiling, tile_size=tile_size).clamp(-1, 1)


def cmd_decode(args: argparse.Namespace) -> int:
    from .cli import resolve_model, tiling_kwargs
    from .images import tensor_to_pil

    vae = resolve_model(args.model)
    items, cache = read_latents(args.latents)
    if cache:
        print(f"{args.latents}: an encode cache: decoding its stored posterior means as raw latents"
              + (" (--raw is implied)" if not args.raw else ""))
        raw = True
    else:
        raw = args.raw
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        print(f"{args.latents}: treating {len(items)} latent(s) as "
              + ("raw VAE latents (--raw)" if raw else
                 f"normalised (z - {shift}) * {vae.config.scaling_factor}; pass --raw for raw VAE latents"))
    for name, t in items:
        api.check_latents(vae, t, name=f"{args.latents}: {name}")  # every item before writing anything
    out = Path(args.out)
    by_shape: dict[tuple, list[Named]] = {}
    for it in items:
        by_shape.setdefault(tuple(it[1].shape), []).append(it)
    n = 0
    for group in by_shape.values():
        for s in range(0, len(group), args.batch_size):
            chunk = group[s : s + args.batch_size]
            images = decode_latents(vae, torch.stack([t for _, t in chunk]), raw=raw, **tiling_kwargs(args))
            for (name, _), im in zip(chunk, tensor_to_pil(images)):
                dest = out / f"{name}.png"
                dest.parent.mkdir(parents=True, exist_ok=True)
                im.save(dest)
                n += 1
    print(f"wrote {n} PNG(s) to {out}")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from .cli import resolve_model, tiling_kwargs

    vae = resolve_model(args.model, dtype=args.model_dtype)
    res = encode_dataset(
        vae, args.data, args.out, resolution=args.resolution or 256, buckets=args.buckets, shard_size=args.shard_size,
        dtype=args.dtype, batch_size=args.batch_size, num_workers=args.num_workers, overwrite=args.overwrite,
        model_name=args.model, **tiling_kwargs(args),
    )
    print(f"{res.n_samples} samples in {res.out / 'manifest.json'}: encoded {res.n_encoded}, "
          f"unchanged {res.n_unchanged}, skipped {res.n_skipped}; {res.images_per_s:.2f} images/s")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    from .cli import MODEL_HELP, add_tiling_args

    p = sub.add_parser(
        "encode",
        help="encode an image folder into a sharded, resumable latent cache",
        description="Encode every image under DATA (recursive) into OUT: safetensors shards of raw posterior "
        "mean and log-variance per image, per-image metadata (path, sha256, original size, crop box) and "
        "OUT/manifest.json (model hash, scaling/shift factors, transform, counts, skipped files). Run the "
        "same command again after a crash or after changing images: finished work is kept, changed images "
        "are re-encoded. Under `accelerate launch` every process encodes its own share.",
    )
    p.add_argument("model", metavar="MODEL", nargs="?", default=None, help=MODEL_HELP + " (default: the shipped model)")
    p.add_argument("data", metavar="DATA", help="image folder (searched recursively) or one image file")
    p.add_argument("out", metavar="OUT", help="output folder for shards and manifest.json")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resolution", type=int, default=None, help="centre crop to N x N pixels (multiple of 8; default 256)")
    g.add_argument("--buckets", type=int, default=None, metavar="AREA",
                   help="aspect-ratio buckets with sides multiples of 64 and about AREA pixels (e.g. 65536 for 256^2)")
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard file (default 256)")
    p.add_argument("--dtype", choices=list(api.DTYPES), default="fp32", help="stored latent dtype (default fp32)")
    p.add_argument("--model-dtype", choices=list(api.DTYPES), default=None, help="run the encoder in this dtype (default: as loaded)")
    p.add_argument("--batch-size", type=int, default=8, help="images per encoder call (default 8)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes for decoding/resizing (0: in-process)")
    p.add_argument("--overwrite", action="store_true", help="delete a cache made with another model/transform/dtype in OUT")
    add_tiling_args(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser(
        "decode",
        help="decode latents (an encode cache, a shard or a tensor file) to PNGs",
        description="Decode LATENTS to PNGs in OUT. An encode output folder or shard: its stored posterior means "
        "(raw), PNGs named after the source images. A .safetensors/.pt tensor file (B, C, h, w) or (C, h, w): "
        "normalised latents (z - shift) * scale as a diffusion model produces, or raw with --raw; PNGs 00000.png, ...",
    )
    p.add_argument("model", metavar="MODEL", nargs="?", default=None, help=MODEL_HELP + " (default: the shipped model)")
    p.add_argument("latents", metavar="LATENTS", help="encode output folder, one shard, or a .safetensors/.pt tensor file")
    p.add_argument("out", metavar="OUT", help="output folder for PNGs")
    p.add_argument("--raw", action="store_true", help="tensor file holds raw VAE latents, not normalised ones")
    p.add_argument("--batch-size", type=int, default=8, help="latents per decoder call (default 8)")
    add_tiling_args(p)
    p.set_defaults(func=cmd_decode)
