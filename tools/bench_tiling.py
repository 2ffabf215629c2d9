"""Benchmark exact tiling (kl_autoencoder/inference/tiling.py): peak memory, time and error vs untiled and diffusers.

Memory: every cell (method x operation x size) runs in a fresh subprocess that reports its own peak
resident memory (VmHWM from /proc/self/status, i.e. ru_maxrss) so cells cannot contaminate each
other. Untiled cells whose estimate (memory_plan.estimate_untiled_bytes) exceeds --max-gb are skipped;
any cell running past --timeout is killed and reported.

    python tools/bench_tiling.py memory --sizes 512 1024          # tiny-kl-f8, encode + decode
    python tools/bench_tiling.py accuracy                         # 1024x1024 / 1000x744 errors
    python tools/bench_tiling.py accuracy --model weights/kl-f8c4-bsds-urban-cpu   # the same, trained weights
    python tools/bench_tiling.py sd --size 2048                   # one SD-preset tiled decode, timed

The allocator reuse of kl_autoencoder/inference/malloc.py is off here (KL_AUTOENCODER_MALLOC=0 unless set): it
raises the untiled peak (tools/bench.py measures it) and never runs in the tiled modes, so the table
compares the methods themselves.

Weights are the preset's init perturbed by tests/conftest.perturb (GroupNorm affine, attention
non-trivial); nothing is downloaded. Run it niced: it uses all cores (`nice -n 10 python ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("KL_AUTOENCODER_MALLOC", "0")  # inherited by the cell subprocesses (see above)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kl_autoencoder as ka  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import perturb  # noqa: E402  (the tests' weight perturbation: same non-trivial model)
from kl_autoencoder.inference import memory_plan, tiling, tiling_approx  # noqa: E402
from kl_autoencoder.inference.codec import _prepare  # noqa: E402
from kl_autoencoder.utils.files import save_json  # noqa: E402

METHODS = ("untiled", "diffusers", "ours", "approx")  # ours: exact tiling; approx: tiling_approx.py


def photo(h: int, w: int) -> torch.Tensor:
    """A real photo (scikit-image astronaut, no download) resized to h x w: (1, 3, h, w) in [-1, 1]."""
    from PIL import Image
    from skimage import data

    im = Image.fromarray(data.astronaut()).resize((w, h), Image.BICUBIC)
    return ka.images.pil_to_tensor(im)[None]


def peak_rss() -> int:
    """This process's peak resident set size in bytes (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(vae, method: str, op: str, x: torch.Tensor, tile: int) -> torch.Tensor:
    """One encode (images -> raw posterior mean) or decode (raw latents -> images)."""
    with torch.no_grad():
        if method == "diffusers":
            vae.enable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // 8
            out = vae.encode(x).latent_dist.mean if op == "encode" else vae.decode(x).sample
            vae.disable_tiling()
            return out
        if method == "untiled":
            if op == "encode":
                return vae.quant_conv(vae.encoder(x))[:, : vae.config.latent_channels]
            return vae.decoder(vae.post_quant_conv(x))
        if method == "approx":
            if op == "encode":
                return tiling_approx.approx_encode_moments(vae, x, tile)[0]
            return tiling_approx.approx_decode(vae, x, tile)
        if op == "encode":
            return tiling.tiled_encode_moments(vae, x, tile)[0]
        return tiling.tiled_decode(vae, x, tile)


def worker(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    vae = perturb(ka.create(args.preset))
    s = args.size
    x = torch.rand(1, 3, s, s) * 2 - 1 if args.op == "encode" else torch.randn(1, 4, s // 8, s // 8)
    base = peak_rss()
    t = time.perf_counter()
    out = run(vae, args.method, args.op, x, args.tile)
    sec = time.perf_counter() - t
    print(json.dumps({"peak": peak_rss(), "base": base, "sec": sec, "finite": bool(torch.isfinite(out).all())}))


def memory(args: argparse.Namespace) -> None:
    vae = ka.create(args.preset)
    rows = []
    print(f"{args.preset}, tile {args.tile} px, one image; peak RSS of a fresh process (GiB), baseline = model + input")
    print(f"{'op':7} {'size':>5} {'method':10} {'peak GiB':>9} {'-base GiB':>9} {'sec':>7}")
    for op in args.ops:
        for size in args.sizes:
            for method in args.methods:
                shape = (1, 3, size, size) if op == "encode" else (1, 4, size // 8, size // 8)
                est = memory_plan.estimate_untiled_bytes(vae, shape, op) / 2**30
                if method == "untiled" and est > args.max_gb:
                    print(f"{op:7} {size:5} {method:10} skipped: untiled estimate {est:.1f} GiB > --max-gb {args.max_gb}")
                    continue
                cmd = [sys.executable, __file__, "_worker", "--preset", args.preset, "--method", method, "--op", op,
                       "--size", str(size), "--tile", str(args.tile)]
                try:
                    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    print(f"{op:7} {size:5} {method:10} skipped: over --timeout {args.timeout} s")
                    continue
                if p.returncode:
                    print(f"{op:7} {size:5} {method:10} failed (exit {p.returncode}): {p.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(p.stdout.strip().splitlines()[-1])
                r.update(op=op, size=size, method=method, untiled_estimate_gib=est)
                rows.append(r)
                print(f"{op:7} {size:5} {method:10} {r['peak'] / 2**30:9.2f} {(r['peak'] - r['base']) / 2**30:9.2f} {r['sec']:7.1f}", flush=True)
    if args.json:
        save_json(rows, args.json)


def accuracy(args: argparse.Namespace) -> None:
    """|tiled - untiled| for encode (posterior mean) and decode: exact, approx, diffusers enable_tiling()."""
    if args.model:
        vae, name = ka.load(args.model).float().eval(), args.model
    else:
        vae, name = perturb(ka.create(args.preset)), f"{args.preset} (perturbed)"
    print(f"{name}, tile {args.tile} px: max abs difference to the untiled pass (mean abs; decode PSNR vs untiled)")
    for h, w, b in args.shapes:
        x = torch.cat([photo(h, w), photo(h, w).flip(-1)][:b])
        x, _ = _prepare(vae, x, "reflect")  # 1000x744 -> padded to multiples of 8
        ref_z = run(vae, "untiled", "encode", x, args.tile)
        ref_img = run(vae, "untiled", "decode", ref_z, args.tile)
        line = f"  {b}x{h}x{w}: "
        for method in ("ours", "approx", "diffusers"):
            ez = (run(vae, method, "encode", x, args.tile) - ref_z).abs()
            img = run(vae, method, "decode", ref_z, args.tile)
            ei = (img - ref_img).abs()
            p = ka.ka.psnr(img.clamp(-1, 1), ref_img.clamp(-1, 1))
            line += (f"\n    {method:9}: encode {ez.max().item():.2e} ({ez.mean().item():.1e})  "
                     f"decode {ei.max().item():.2e} ({ei.mean().item():.1e}, {p:.1f} dB)")
        print(line, flush=True)


def sd(args: argparse.Namespace) -> None:
    """One SD-preset (83.7 M params, init weights) tiled decode of a size x size image, timed, peak RSS."""
    vae = ka.create("sd-kl-f8")
    z = torch.randn(1, 4, args.size // 8, args.size // 8)
    base = peak_rss()
    t = time.perf_counter()
    out = tiling.tiled_decode(vae, z, args.tile)
    sec = time.perf_counter() - t
    print(f"sd-kl-f8 tiled decode {args.size}x{args.size}, tile {args.tile}: {sec:.0f} s, peak RSS {peak_rss() / 2**30:.2f} GiB "
          f"(model + latent {base / 2**30:.2f} GiB), finite {bool(torch.isfinite(out).all())}, threads {torch.get_num_threads()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("memory", help="peak RSS vs image size, each cell in a fresh process")
    p.add_argument("--preset", default="tiny-kl-f8")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--ops", nargs="+", choices=["encode", "decode"], default=["encode", "decode"])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--tile", type=int, default=256, help="tile size in image pixels (ours and diffusers)")
    p.add_argument("--max-gb", type=float, default=12.0, help="skip untiled cells whose estimate is larger")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per cell")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.set_defaults(func=memory)
    p = sub.add_parser("accuracy", help="tiled vs untiled max abs error, ours and diffusers")
    p.add_argument("--preset", default="tiny-kl-f8")
    p.add_argument("--model", default=None, help="a diffusers folder (e.g. weights/kl-f8c4-bsds-urban-cpu) instead of the perturbed preset")
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--shapes", type=lambda s: tuple(int(v) for v in s.split("x")), nargs="+",
                   default=[(1024, 1024, 1), (1000, 744, 1), (512, 384, 2)], help="HxWxB, e.g. 1000x744x1")
    p.set_defaults(func=accuracy)
    p = sub.add_parser("sd", help="one sd-kl-f8 tiled decode, timed")
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--tile", type=int, default=512)
    p.set_defaults(func=sd)
    p = sub.add_parser("_worker")
    for a in ("--preset", "--method", "--op"):
        p.add_argument(a)
    p.add_argument("--size", type=int)
    p.add_argument("--tile", type=int)
    p.set_defaults(func=worker)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
