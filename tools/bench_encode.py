"""Encode throughput: the full `kl-autoencoder encode` command (default engine, and `--engine ray`) vs bare
`vae.encode` on pre-loaded tensors.

    python tools/bench_encode.py [--images 48] [--resolution 256] [--batch-size 8] [--repeats 2] [--no-ray]
                                 [--dtype bf16]

Model: the tiny-kl-f8 preset (untrained weights; speed does not depend on training), exported to a
folder so the command loads it as a user would. Images: ../shared/data/bsds500 (JPEG 481x321) if
present, else generated PNGs. The command's figure is end to end inside one process (model loading
and hashing, file listing, sha256 of every file, JPEG decode, crop/resize, encode, shard writing,
manifest); the bare figure times only `vae.encode(x)` on tensors already in memory. The Ray figure is
the same command with `--engine ray` on a local Ray cluster started once before the runs (as a cluster
would already be running): it includes starting the encoder actors (each imports torch and loads the
model), Ray Data's scheduling and moving pixels and moments through the object store. Runs alternate
(bare, command, ray, bare, ...) and the best of each is reported, so all see the same machine load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import kl_autoencoder as ka
from kl_autoencoder import cli
from kl_autoencoder.cli.common import resolve_model
from kl_autoencoder.latents.buckets import Transform
from kl_autoencoder.utils.images import find_images, load_image, pil_to_tensor

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bsds500"


def dataset(n: int, tmp: Path) -> tuple[Path, str]:
    data = tmp / "data"
    data.mkdir()
    files = find_images(SHARED)[:n] if SHARED.is_dir() else []
    for f in files:
        shutil.copy(f, data / f"{f.parent.name}_{f.name}")
    rng = np.random.default_rng(0)
    for i in range(n - len(files)):  # generated: smooth colour fields plus noise, 480x320
        yy, xx = np.mgrid[0:320, 0:480] / 100.0
        a = np.stack([np.sin(xx * (i + 1)), np.cos(yy * (i + 2)), np.sin((xx + yy) * 0.5)], -1) * 100 + 128
        a = np.clip(a + rng.normal(0, 10, a.shape), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(data / f"gen{i:03d}.png")
    return data, (f"{len(files)} BSDS500 JPEGs" if files else f"{n} generated PNGs")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="tiny-kl-f8", help="preset or model folder")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="the command's --dtype; the bare figure runs the same model (our CPU path) in that dtype")
    ap.add_argument("--no-ray", action="store_true", help="skip the --engine ray runs")
    ap.add_argument("--ray-actors", type=int, default=None, help="encoder actors (default: the engine's plan)")
    args = ap.parse_args()
    use_ray = not args.no_ray and _start_ray()
    tmp = Path(tempfile.mkdtemp(prefix="bench_encode_"))
    try:
        data, what = dataset(args.images, tmp)
        vae = resolve_model(args.model)
        model = tmp / "model"
        ka.export(vae, model)
        t = Transform.fixed(args.resolution)
        x = torch.stack([pil_to_tensor(t(load_image(f))[0]) for f in find_images(data)])  # (N, 3, R, R) in [-1, 1]
        if args.dtype == "bf16":
            vae, x = vae.to(torch.bfloat16), x.to(torch.bfloat16)  # resolve_model's model, so our bf16 CPU path
        batches = list(x.split(args.batch_size))
        print(f"{what}, {args.resolution}x{args.resolution}, batch {args.batch_size}, {args.model} {args.dtype}, "
              f"{torch.get_num_threads()} torch threads, {args.num_workers} loader worker(s)")
        with torch.no_grad():
            vae.encode(batches[0])  # warm-up
        bare, cmd, rays = [], [], []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                for b in batches:
                    vae.encode(b).latent_dist.mean
            bare.append(len(x) / (time.perf_counter() - t0))
            out = tmp / f"out{r}"
            argv = ["encode", str(model), str(data), str(out), "--resolution", str(args.resolution),
                    "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers), "--tiling", "never",
                    "--dtype", args.dtype]
            t0 = time.perf_counter()
            assert cli.main(argv) == 0
            cmd.append(len(x) / (time.perf_counter() - t0))
            line = f"run {r}: bare {bare[-1]:.2f} images/s, command {cmd[-1]:.2f} images/s"
            if use_ray:
                extra = ["--ray-actors", str(args.ray_actors)] if args.ray_actors else []
                t0 = time.perf_counter()
                assert cli.main(argv[:3] + [str(tmp / f"ray{r}")] + argv[4:] + ["--engine", "ray"] + extra) == 0
                rays.append(len(x) / (time.perf_counter() - t0))
                line += f", command --engine ray {rays[-1]:.2f} images/s"
            print(line)
        b, c = max(bare), max(cmd)
        print(f"bare vae.encode: {b:.2f} images/s | encode command: {c:.2f} images/s | ratio {c / b:.3f}")
        if use_ray:
            print(f"default engine: {c:.2f} images/s | --engine ray: {max(rays):.2f} images/s | ray / default "
                  f"{max(rays) / c:.3f}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _start_ray() -> bool:
    """A local Ray cluster on this machine's CPUs, started before the timed runs; False without Ray."""
    try:
        import ray
    except ImportError:
        print("ray not installed (pip install 'kl-autoencoder[ray]'): default engine only")
        return False
    # Ray runs its workers at niceness 15 (RAY_worker_niceness) so the raylet stays responsive; on a shared
    # machine that alone would hand the default engine (niceness 0) the CPU whenever anything else runs
    os.environ.setdefault("RAY_worker_niceness", "0")
    t0 = time.perf_counter()
    ray.init(include_dashboard=False, logging_level="WARNING")
    print(f"local Ray cluster ({ray.cluster_resources().get('CPU', 0):g} CPUs) started in {time.perf_counter() - t0:.1f} s")
    return True


if __name__ == "__main__":
    sys.exit(main())
