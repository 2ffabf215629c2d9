"""GPU check: the paths users run on a GPU, one printed line per check, then one summary line.

    python tools/gpu_check.py                         # a CUDA GPU: about 5 minutes on one H200
    python tools/gpu_check.py --device cpu --quick    # the same checks at toy sizes on a CPU (< 2 minutes; tests run it)

1. resume: the tiny-kl-f8 preset (a micro model with --quick) trained N steps with bf16 autocast
   (train.mixed_precision=bf16) and deterministic kernels; a second run is SIGKILLed after its checkpoint at
   ~60% and started again with the same command: its final weights must equal the uninterrupted run's
   (max |diff| <= 1e-6, the tolerance of tests/test_train.py::test_exact_resume_after_sigkill).
2. encode fp16 / bf16: the sd-kl-f8 preset (random weights) on 256 generated 512x512 JPEGs: images/s of the
   `encode` job (``ka.encode_dataset``: decoding, batching, shards) and of plain diffusers
   ``AutoencoderKL.encode`` on the same pixels in memory, and the max |error| of the posterior means vs fp32.
3. decode 4096: a (1, 4, 512, 512) SD latent to a 4096x4096 image: untiled, exact tiling (``tiling="always"``)
   and diffusers ``enable_tiling()``: seconds, peak memory (``torch.cuda.max_memory_allocated``; the RSS rise on
   a CPU) and max |diff| of each against the fp32 untiled decode (exact tiling must stay within 1e-3).

Weights are random (seeded): speed and exactness do not depend on training. Each check prints PASS, FAIL or
SKIP; the last line is ``gpu_check: P passed, F failed, S skipped (device ...)``; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kl_autoencoder as ka  # noqa: E402
from kl_autoencoder.config import ModelConfig  # noqa: E402
from kl_autoencoder.evaluation.samples import synthetic_images  # noqa: E402
from kl_autoencoder.training import load_checkpoint  # noqa: E402
from kl_autoencoder.utils.images import load_image, pil_to_tensor, tensor_to_pil  # noqa: E402

MICRO = {"block_out_channels": [8, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 4,
         "sample_size": 256, "scaling_factor": 1.0}  # sample_size: diffusers' enable_tiling() tile (256 px, as SD's 512)
RESULTS: list[tuple[str, str, str]] = []  # (check, PASS/FAIL/SKIP, details)


def report(check: str, status: str, details: str) -> None:
    RESULTS.append((check, status, details))
    print(f"{status:4s} {check}: {details}", flush=True)


class Peak:
    """Peak memory above the start of the block: CUDA allocator peak, or the process RSS sampled every 2 ms."""

    def __init__(self, device: torch.device):
        self.device, self.mib = device, 0.0

    def __enter__(self) -> "Peak":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base, self.stop = _rss(), threading.Event()
            self.peak = [0]
            self.thread = threading.Thread(target=self._watch, daemon=True)
            self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def _watch(self) -> None:
        while not self.stop.is_set():
            self.peak[0] = max(self.peak[0], _rss() - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        else:
            self.stop.set()
            self.thread.join()
            self.mib = max(self.peak[0], _rss() - self.base) / 2**20
        self.seconds = time.perf_counter() - self.t0


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- 1. resume


def _train_cmd(config: Path, data: Path, out: Path, steps: int) -> list[str]:
    """The trainer takes the GPU when one is visible (accelerate); CUDA_VISIBLE_DEVICES decides."""
    return [sys.executable, "-m", "kl_autoencoder.cli", "train", str(config), "--data", str(data), "--output", str(out),
            "--max-steps", str(steps)]


def check_resume(tmp: Path, device: torch.device, quick: bool) -> None:
    import yaml

    steps, every = (10, 3) if quick else (200, 40)
    kill_after = (steps * 6 // 10) // every * every  # the checkpoint at ~60%: step 120 of 200
    base = ka.load_config("tiny-kl-f8").to_dict()
    base["model"].update(MICRO if quick else {})
    base["loss"].update(perceptual="none", disc_start=steps // 2)  # the GAN too, from half-way
    base["train"].update(mixed_precision="bf16", deterministic=True, batch_size=4, num_workers=0, checkpoint_every=every,
                         keep_checkpoints=10, log_every=1, eval_every=10**6, image_every=10**6, ema_decay=0.99, max_steps=steps)
    base["data"].update(crop_size=32 if quick else 128)
    config = tmp / "resume.yaml"
    config.write_text(yaml.safe_dump(base))
    data = tmp / "resume-data"
    data.mkdir()
    size = 48 if quick else 160
    for i, im in enumerate(tensor_to_pil(synthetic_images(8, size, seed=3))):
        im.save(data / f"{i}.png")
    env = dict(os.environ) if device.type == "cuda" else {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    straight, killed = tmp / "straight", tmp / "killed"
    t0 = time.perf_counter()
    # the uninterrupted run and the one to kill side by side (each keys every draw by step: they don't interact)
    ref = subprocess.Popen(_train_cmd(config, data, straight, steps), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, env=env)
    proc = subprocess.Popen(_train_cmd(config, data, killed, steps), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    target = killed / "checkpoints" / f"step-{kill_after:08d}.pt"
    while not target.exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (killed / "export").exists():
        report("resume", "FAIL", "the second run finished before it could be killed; nothing was checked")
        return
    r = subprocess.run(_train_cmd(config, data, killed, steps), capture_output=True, text=True, env=env)
    _, ref_err = ref.communicate()
    if ref.returncode or r.returncode:
        why = (ref_err if ref.returncode else r.stderr).strip().splitlines()
        report("resume", "FAIL", f"{'the uninterrupted' if ref.returncode else 'the resumed'} run failed: {why[-1] if why else '?'}")
        return
    a = load_checkpoint(straight / "checkpoints" / f"step-{steps:08d}.pt")
    b = load_checkpoint(killed / "checkpoints" / f"step-{steps:08d}.pt")
    diff = max(float((a[p][k].float() - b[p][k].float()).abs().max()) for p in ("vae", "discriminator") for k in a[p])
    status = json.loads((killed / "status.json").read_text())
    ok = diff <= 1e-6 and status["skipped_nonfinite"] == 0
    report("resume", "PASS" if ok else "FAIL",
           f"{'micro' if quick else 'tiny-kl-f8'}, bf16 autocast, {steps} steps, SIGKILL after step {kill_after}, resumed: "
           f"max |weights - uninterrupted| {diff:.2e} (limit 1e-6); non-finite steps {status['skipped_nonfinite']}; "
           f"{time.perf_counter() - t0:.0f} s for the three runs")


# ----------------------------------------------------------------------------- 2. encode


def check_encode(tmp: Path, device: torch.device, quick: bool) -> None:
    n, size, batch = (16, 64, 8) if quick else (256, 512, 16)
    preset = ModelConfig(**MICRO) if quick else "sd-kl-f8"
    data = tmp / "encode-data"
    data.mkdir()
    for i in range(0, n, 16):
        for j, im in enumerate(tensor_to_pil(synthetic_images(min(16, n - i), size, seed=100 + i))):
            im.save(data / f"{i + j:05d}.jpg", quality=95)
    # the pixels the job will see (decoded JPEGs), so both errors below measure the dtype alone
    x = torch.stack([pil_to_tensor(load_image(f)) for f in sorted(data.iterdir())])  # (n, 3, size, size) in [-1, 1]
    ref = ka.create(preset).to(device)
    with torch.no_grad():
        mean32 = torch.cat([ref.encode(b.to(device)).latent_dist.mean.float().cpu() for b in x.split(batch)])
    for name in ("fp16", "bf16"):
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[name]
        if name == "fp16" and device.type == "cpu":
            report(f"encode {name}", "SKIP", "fp16 on a CPU: PyTorch's CPU fp16 convolutions are hundreds of times slower")
            continue
        vae = ka.create(preset).to(device, dtype)
        vae.register_to_config(force_upcast=False)  # the dtype under test, not diffusers' fp32 fallback
        with torch.no_grad():  # plain diffusers, pixels already in memory
            vae.encode(x[:batch].to(device, dtype))
            _sync(device)
            t0 = time.perf_counter()
            means = [vae.encode(b.to(device, dtype)).latent_dist.mean.float().cpu() for b in x.split(batch)]
            _sync(device)
            plain = n / (time.perf_counter() - t0)
        err_plain = float((torch.cat(means) - mean32).abs().max())
        t0 = time.perf_counter()
        res = ka.encode_dataset(vae, data, tmp / f"cache-{name}", resolution=size, batch_size=batch, num_workers=min(4, os.cpu_count() or 1),
                                tiling="never", progress=False)
        ours = res.n_encoded / (time.perf_counter() - t0)
        ds = ka.LatentDataset(tmp / f"cache-{name}")
        stored = torch.stack([ds.moments(i)[0] for i in range(len(ds))])
        err_ours = float((stored - mean32).abs().max())
        ok = res.n_encoded == n and bool(torch.isfinite(stored).all())
        report(f"encode {name}", "PASS" if ok else "FAIL",
               f"{n} images {size}px, batch {batch}: encode job {ours:.1f} images/s, plain diffusers encode {plain:.1f} "
               f"images/s (in memory, no decoding); max |mean - fp32| job {err_ours:.2e}, plain {err_plain:.2e}")


# ----------------------------------------------------------------------------- 3. decode


def check_decode(tmp: Path, device: torch.device, quick: bool) -> None:
    side = 64 if quick else 512  # latent side: 512 -> a 4096x4096 image
    preset = ModelConfig(**MICRO) if quick else "sd-kl-f8"
    z = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))  # normalised latents
    vae = ka.create(preset).to(device)
    # cuDNN runs fp32 convolutions in TF32 by default (torch.backends.cudnn.allow_tf32): untiled and tiled then
    # differ by TF32 rounding (5.1e-03 on an H200), not by tiling. The exactness check compares true fp32.
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _decode_rows(vae, z, device, preset, side)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _decode_rows(vae, z: torch.Tensor, device: torch.device, preset, side: int) -> None:
    with torch.no_grad():
        with Peak(device) as p_ref:
            ref = ka.decode(vae, z, tiling="never").cpu()
        rows = [f"untiled fp32 {p_ref.seconds:.1f} s {p_ref.mib:.0f} MiB"]
        with Peak(device) as p:
            exact = ka.decode(vae, z, tiling="always").cpu()
        err_exact = float((exact - ref).abs().max())
        rows.append(f"exact tiling {p.seconds:.1f} s {p.mib:.0f} MiB max|diff| {err_exact:.1e}")
        vae.enable_tiling()
        with Peak(device) as p:
            theirs = vae.decode(z.to(device) / vae.config.scaling_factor).sample.float().cpu()
        vae.disable_tiling()
        rows.append(f"diffusers enable_tiling {p.seconds:.1f} s {p.mib:.0f} MiB max|diff| {float((theirs - ref).abs().max()):.1e}")
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            if name == "fp16" and device.type == "cpu":
                continue
            half = ka.create(preset).to(device, dtype)
            half.register_to_config(force_upcast=False)
            with Peak(device) as p:
                out = ka.decode(half, z, tiling="always").cpu()
            rows.append(f"exact tiling {name} {p.seconds:.1f} s {p.mib:.0f} MiB max|diff| {float((out - ref).abs().max()):.1e}")
            del half
    ok = err_exact <= 1e-3 and bool(torch.isfinite(exact).all())
    report("decode", "PASS" if ok else "FAIL", f"{side * 8}x{side * 8} image: " + "; ".join(rows))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--quick", action="store_true", help="toy sizes (a micro model, few images, small latents)")
    ap.add_argument("--only", nargs="*", choices=["resume", "encode", "decode"], default=None, help="run only these checks")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu --quick", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"gpu_check on {name}; torch {torch.__version__}; {'quick' if args.quick else 'full'} sizes", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for check in (check_resume, check_encode, check_decode):
            label = check.__name__.removeprefix("check_")
            if args.only and label not in args.only:
                continue
            try:
                sub = Path(tmp) / label
                sub.mkdir()
                check(sub, device, args.quick)
            except Exception as e:  # noqa: BLE001 - a failed check is reported and the next one runs
                report(label, "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                traceback.print_exc(limit=3)
    counts = {s: sum(r[1] == s for r in RESULTS) for s in ("PASS", "FAIL", "SKIP")}
    print(f"gpu_check: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped "
          f"(device {name}, {time.perf_counter() - t0:.0f} s)")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
