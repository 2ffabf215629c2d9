"""Inference and training speed of kl-autoencoder against plain diffusers, interleaved in one run.

    python tools/bench.py            # SD preset at 256 and 512, 2 repeats, + training overhead
    python tools/bench.py --quick    # 256 only, 1 repeat

Inference: ``AutoencoderKL.encode(x).latent_dist.mean`` / ``.decode(z).sample`` under ``torch.no_grad``
(plain diffusers eager) against our path (``fastconv.optimize`` + ``ka.encode_moments`` / ``ka.decode``
under ``torch.inference_mode``) on the same weights and input; a third role, plain diffusers inside
``malloc.reuse_freed_memory()``, shows what the allocator change alone gives. Each role runs in its own
process (malloc's state is per process: a heap our calls grew would speed up a baseline in the same
process); the parent alternates calls between them within each repeat, so load from other processes
on a shared CPU hits all alike. The speedup is the ratio of the best times, after one untimed warm-up
call each (its time is printed: ours packs its Winograd weights there, once per layer). Peak memory:
the largest rise of the role's process RSS during a call, sampled every 2 ms.

Training: steps/s of ``kl_autoencoder.training.train`` against a minimal loop (same tiny model, L1 + KL,
Adam, same batch size and crop) on one in-memory batch; ``train_overhead = plain / trainer - 1``.
The last line is machine-readable:
``decode_speedup_vs_diffusers=<x> encode_speedup_vs_diffusers=<y> train_overhead=<z>``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import kl_autoencoder as ka
from kl_autoencoder.inference import fastconv

PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def timed(fn) -> tuple[float, float, object]:
    """(seconds, peak RSS rise in MiB, result) of ``fn()``."""
    base, peak, stop = _rss(), [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss() - base)
            time.sleep(0.002)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    start = time.perf_counter()
    out = fn()
    sec = time.perf_counter() - start
    stop.set()
    t.join()
    return sec, max(peak[0], _rss() - base) / 2**20, out


ROLES = {
    "plain": "diffusers eager, glibc malloc defaults (what a diffusers user gets)",
    "plain_reuse": "diffusers eager inside malloc.reuse_freed_memory() (the allocator change alone)",
    "ours": "fastconv.optimize + ka.encode_moments / ka.decode (everything)",
}


def _worker(conn, role: str, x: torch.Tensor, z: torch.Tensor) -> None:
    """One process per role, so no role inherits another's heap (malloc state is per process)."""
    import contextlib

    from kl_autoencoder.inference import malloc

    vae = ka.create("sd-kl-f8", seed=0)  # random but fixed weights: speed does not depend on training
    if role == "ours":
        vae = fastconv.optimize(vae)
        latents = ka.normalize_latents(vae, z)
        fns = {"enc": lambda: ka.encode_moments(vae, x)[0], "dec": lambda: ka.decode(vae, latents)}
        scope = torch.inference_mode
    else:
        fns = {"enc": lambda: vae.encode(x).latent_dist.mean, "dec": lambda: vae.decode(z).sample}
        scope = malloc.reuse_freed_memory if role == "plain_reuse" else contextlib.nullcontext
    while (op := conn.recv()) is not None:
        with torch.no_grad(), scope():
            conn.send(timed(fns[op]))


def bench_inference(size: int, repeats: int) -> dict[str, float]:
    """Each role runs in its own process; the parent alternates calls between them, so load from other
    processes on a shared CPU hits all alike, and only one of them computes at a time."""
    import multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, size, size, generator=g) * 2 - 1  # (1, 3, S, S) in [-1, 1]
    with torch.no_grad():
        z = ka.create("sd-kl-f8", seed=0).encode(x).latent_dist.mean  # (1, 4, S/8, S/8) raw
    print("  roles: " + "; ".join(f"{k} = {v}" for k, v in ROLES.items()), flush=True)
    ctx = mp.get_context("spawn")
    workers = {}
    for role in ROLES:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, role, x, z), daemon=True)
        proc.start()
        workers[role] = (parent, proc)

    def call(role: str, op: str) -> tuple[float, float, torch.Tensor]:
        workers[role][0].send(op)
        return workers[role][0].recv()

    calls = [(role, op) for op in ("enc", "dec") for role in ROLES]
    # One untimed warm-up call each: oneDNN builds its primitives on a first call, and ours also
    # transforms and packs the Winograd weights once per layer (and per band shape); reported apart.
    first = {f"{role}_{op}": call(role, op)[0] for role, op in calls}
    print(f"  {size}px first (warm-up) calls: " + ", ".join(f"{k} {v:.2f} s" for k, v in first.items()), flush=True)
    res: dict[str, list] = {}
    outs = {}
    for r in range(repeats):
        for role, op in calls:
            sec, mib, out = call(role, op)
            res.setdefault(f"{role}_{op}", []).append((sec, mib))
            outs[f"{role}_{op}"] = out
            print(f"  {size}px repeat {r + 1}/{repeats} {role}_{op}: {sec:.2f} s, +{mib:.0f} MiB", flush=True)
    for conn, proc in workers.values():
        conn.send(None)
        proc.join()
    best = {k: min(s for s, _ in v) for k, v in res.items()}
    mem = {k: max(m for _, m in v) for k, v in res.items()}
    return {
        "size": size,
        **{f"{k}_img_s": 1 / v for k, v in best.items()},
        **{f"{k}_peak_mib": v for k, v in mem.items()},
        **{f"{k}_first_s": v for k, v in first.items()},
        "encode_speedup": best["plain_enc"] / best["ours_enc"],
        "decode_speedup": best["plain_dec"] / best["ours_dec"],
        "encode_speedup_reuse_only": best["plain_enc"] / best["plain_reuse_enc"],
        "decode_speedup_reuse_only": best["plain_dec"] / best["plain_reuse_dec"],
        "encode_max_err": float((outs["plain_enc"] - outs["ours_enc"]).abs().max()),
        "decode_max_err": float((outs["plain_dec"] - outs["ours_dec"]).abs().max()),
    }


# ----------------------------------------------------------------------------- training


def _train_config(steps: int, crop: int, batch: int):
    from kl_autoencoder.config import load_config

    return load_config("tiny-kl-f8", [
        "loss.perceptual=none", f"train.batch_size={batch}", f"data.crop_size={crop}", f"train.max_steps={steps}",
        "train.eval_every=1000000", "train.checkpoint_every=1000000", "train.image_every=1000000",
        "train.num_workers=0", "train.log_every=1", "train.ema_decay=null", "loss.disc_start=1000000",
    ])


def plain_loop_steps_per_s(cfg, batch: torch.Tensor, steps: int) -> float:
    """The minimal loop: same model, L1 + KL (LDM: sum over latent elements / batch), Adam; one fixed batch."""
    vae = ka.create(cfg).train()
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.train.lr, betas=cfg.train.betas)
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        post = vae.encode(batch).latent_dist
        mean, logvar = post.mean, post.logvar
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)
        rec = vae.decode(z).sample
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum() / batch.shape[0]
        loss = (rec - batch).abs().mean() + cfg.loss.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up, as the trainer's first step is inside its own timing too
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def trainer_steps_per_s(cfg, data: Path, out: Path) -> float:
    """steps/s as ``kl_autoencoder.training.train`` itself reports it (setup and final export excluded)."""
    from kl_autoencoder.training.trainer import train

    status = train(cfg, data, out)
    return float(status["losses"]["steps_per_s"])


def _photo_folder(root: Path, n: int, size: int) -> Path:
    from skimage import data as skdata
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    arrays = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    for i in range(n):
        im = Image.fromarray(arrays[i % len(arrays)]).convert("RGB").resize((size + 8 * i, size + 4 * i))
        im.save(root / f"{i:03d}.png")
    return root


def run_training(steps: int, crop: int = 128, batch: int = 4) -> tuple[float, str]:
    """(train_overhead, note): plain / trainer steps per second - 1."""
    try:
        import kl_autoencoder.training.trainer  # noqa: F401
    except ImportError as e:
        return math.nan, f"kl_autoencoder.training.trainer not importable yet ({e})"
    from kl_autoencoder.training.data import ImageFolder, collate

    with tempfile.TemporaryDirectory() as tmp:
        data = _photo_folder(Path(tmp) / "photos", 8, crop + 32)
        cfg = _train_config(steps + 1, crop, batch)
        ds = ImageFolder(data, crop, random_flip=False, seed=0)
        pixels = collate([ds[i] for i in range(batch)])["pixels"]  # (B, 3, crop, crop) in [-1, 1]
        plain = plain_loop_steps_per_s(cfg, pixels, steps)
        ours = trainer_steps_per_s(cfg, data, Path(tmp) / "run")
        plain2 = plain_loop_steps_per_s(cfg, pixels, steps)  # again after, so drifting load hits both
    plain = max(plain, plain2)
    return plain / ours - 1, f"plain {plain:.3f} steps/s, trainer {ours:.3f} steps/s (tiny-kl-f8, batch {batch}, {crop}px, L1+KL)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 px only, 1 repeat, fewer training steps")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes (default 256 512)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 2)")
    ap.add_argument("--train-steps", type=int, default=None, help="timed training steps (default 8; --quick 3)")
    ap.add_argument("--no-train", action="store_true", help="skip the training comparison")
    args = ap.parse_args(argv)
    sizes = args.sizes or ([256] if args.quick else [256, 512])
    repeats = args.repeats or (1 if args.quick else 2)
    steps = args.train_steps or (3 if args.quick else 8)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, NNPACK {fastconv.nnpack_available()}, fastconv active {fastconv.active()}")
    rows = []
    for s in sizes:
        r = bench_inference(s, repeats)
        rows.append(r)
        print(f"SD kl-f8 {s}px: encode {r['plain_enc_img_s']:.3f} -> {r['ours_enc_img_s']:.3f} img/s (x{r['encode_speedup']:.2f}), "
              f"decode {r['plain_dec_img_s']:.3f} -> {r['ours_dec_img_s']:.3f} img/s (x{r['decode_speedup']:.2f}); "
              f"peak +MiB enc {r['plain_enc_peak_mib']:.0f}/{r['ours_enc_peak_mib']:.0f}, dec {r['plain_dec_peak_mib']:.0f}/"
              f"{r['ours_dec_peak_mib']:.0f}; max |err| enc {r['encode_max_err']:.2e} dec {r['decode_max_err']:.2e}", flush=True)
        print(f"  breakdown {s}px: the allocator change alone makes plain diffusers x{r['encode_speedup_reuse_only']:.2f} (enc) "
              f"x{r['decode_speedup_reuse_only']:.2f} (dec); ours over that: "
              f"x{r['ours_enc_img_s'] / r['plain_reuse_enc_img_s']:.2f} (enc) "
              f"x{r['ours_dec_img_s'] / r['plain_reuse_dec_img_s']:.2f} (dec); peak +MiB plain_reuse enc "
              f"{r['plain_reuse_enc_peak_mib']:.0f} dec {r['plain_reuse_dec_peak_mib']:.0f}", flush=True)
    overhead, note = (math.nan, "skipped (--no-train)") if args.no_train else run_training(steps)
    print(f"training: {note}")
    last = rows[-1]  # the largest size is the headline
    print(f"decode_speedup_vs_diffusers={last['decode_speedup']:.2f} encode_speedup_vs_diffusers={last['encode_speedup']:.2f} "
          f"train_overhead={overhead:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
