"""The trainer: exact resume after SIGKILL, accelerate multi-process equivalence, learning, bad data."""

import dataclasses
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from kl_autoencoder.training.checkpoints import list_checkpoints, load_checkpoint
from kl_autoencoder.config import load_config
from kl_autoencoder.training.trainer import train

from conftest import sample_photos

MICRO_YAML = {
    "model": {"block_out_channels": [8, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8,
              "latent_channels": 4, "sample_size": 32, "scaling_factor": 1.0},
    "loss": {"perceptual": "none", "kl_weight": 1.0e-6, "disc_start": 3, "disc_norm": "batch", "disc_channels": 8},
    "train": {"lr": 1.0e-3, "scale_lr": False, "batch_size": 4, "num_workers": 0, "log_every": 1, "image_every": 5,
              "eval_every": 1000, "checkpoint_every": 4, "keep_checkpoints": 10, "ema_decay": 0.9},
    "data": {"crop_size": 32},
}


def _config(tmp_path: Path, **sections) -> Path:
    cfg = {k: dict(v) for k, v in MICRO_YAML.items()}
    for section, values in sections.items():
        cfg[section].update(values)
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _photo_dir(tmp_path: Path, size: int = 48) -> Path:
    d = tmp_path / "photos"
    d.mkdir(exist_ok=True)
    for i, im in enumerate(sample_photos(None)):
        im.resize((im.width // 6, im.height // 6), Image.BICUBIC).save(d / f"p{i}.png")
    return d


def _cmd(config, data, out, *extra):
    return [sys.executable, "-m", "kl_autoencoder.cli", "train", str(config), "--data", str(data), "--output", str(out), *extra]


def _final(out: Path, step: int) -> dict:
    return load_checkpoint(out / "checkpoints" / f"step-{step:08d}.pt")


def test_exact_resume_after_sigkill(tmp_path):
    config, data = _config(tmp_path), _photo_dir(tmp_path)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = ["--max-steps", "12"]
    subprocess.run(_cmd(config, data, straight, *args), check=True, capture_output=True)
    proc = subprocess.Popen(_cmd(config, data, killed, *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-00000004.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "export").exists(), "the run finished before it was killed"
    subprocess.run(_cmd(config, data, killed, *args), check=True, capture_output=True)  # the same command again
    a, b = _final(straight, 12), _final(killed, 12)
    for part in ("vae", "discriminator"):
        for name, t in a[part].items():
            torch.testing.assert_close(b[part][name], t, atol=1e-6, rtol=0, msg=f"{part}.{name}")
    for s, t in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"]):
        torch.testing.assert_close(t, s, atol=1e-6, rtol=0)
    assert a["ema"]["optimization_step"] == b["ema"]["optimization_step"] == 12
    assert json.loads((killed / "status.json").read_text())["images_seen"] == 48


def test_two_processes_equal_one_with_double_batch(tmp_path):
    data = _photo_dir(tmp_path)
    one = _config(tmp_path, train={"batch_size": 4, "checkpoint_every": 1, "ema_decay": None}, loss={"disc_start": 1000})
    two_cfg = tmp_path / "two.yaml"
    cfg = yaml.safe_load(one.read_text())
    cfg["train"]["batch_size"] = 2
    two_cfg.write_text(yaml.safe_dump(cfg))
    r1 = subprocess.run(_cmd(one, data, tmp_path / "one", "--max-steps", "2"), capture_output=True, text=True)
    assert r1.returncode == 0, r1.stderr
    # `accelerate launch --cpu` runs ONE process unless MPI is set up; --multi_gpu uses torchrun, which on a
    # machine without CUDA starts gloo CPU processes (accelerate DistributedType.MULTI_CPU)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kl_autoencoder.cli", "train", str(two_cfg),
              "--data", str(data), "--output", str(tmp_path / "two"), "--max-steps", "2"]
    r2 = subprocess.run(launch, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    import kl_autoencoder as ka

    w0 = ka.create(load_config(one)).state_dict()
    for step in (1, 2):
        a, b = _final(tmp_path / "one", step), _final(tmp_path / "two", step)
        # Adam's first moment is (1 - beta1) * the batch-mean gradient: the same gradient from 2 x b as from 2b.
        # Compared as one vector: parameters whose gradient is ~0 (1e-8) differ only by rounding noise.
        ga = torch.cat([st["exp_avg"].flatten() for st in a["opt_g"]["state"].values()])
        gb = torch.cat([st["exp_avg"].flatten() for st in b["opt_g"]["state"].values()])
        assert float((ga - gb).norm() / ga.norm()) < (1e-4 if step == 1 else 1e-2)
        # the weights: the update (w - w0) agrees as a whole (Adam's ~lr*sign(g) steps flip only for g ~ 0)
        ua = torch.cat([(a["vae"][n] - w0[n]).flatten() for n in w0])
        ub = torch.cat([(b["vae"][n] - w0[n]).flatten() for n in w0])
        assert float((ua - ub).norm() / ua.norm()) < 0.05  # measured 0.03: rounding-level gradients flip sign
    # only the main process writes: one line per checkpoint, one set of files
    assert (r2.stderr + r2.stdout).count("saved checkpoint") == 2
    assert [p.name for p in list_checkpoints(tmp_path / "two")] == ["step-00000001.pt", "step-00000002.pt"]
    assert json.loads((tmp_path / "two" / "status.json").read_text())["images_seen"] == 8


def test_short_run_on_real_photos_lowers_heldout_l1(tmp_path):
    photos = sample_photos(None)
    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    train_dir.mkdir(), val_dir.mkdir()
    for i, im in enumerate(photos):  # train on the left 2/3 of each photo, hold out the right third
        small = im.resize((im.width // 2, im.height // 2), Image.BICUBIC)
        cut = small.width * 2 // 3
        small.crop((0, 0, cut, small.height)).save(train_dir / f"{i}.png")
        small.crop((cut, 0, small.width, small.height)).save(val_dir / f"{i}.png")
    cfg = load_config("tiny-kl-f8", ["loss.perceptual=none", "train.batch_size=4", "train.lr=1e-3", "data.crop_size=64",
                                     f"data.val_dir={val_dir}", "train.num_workers=0", "train.eval_every=1000",
                                     "train.max_steps=40", "train.checkpoint_every=1000"])
    status = train(cfg, train_dir, tmp_path / "run")
    first = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["step"] == 40
    # the step-0 and final evaluations on the held-out crops
    log = status["validation"]
    assert log["step"] == 40
    # independent check: reload the export and measure held-out L1 for fresh and trained weights
    import kl_autoencoder as ka
    from kl_autoencoder.training.data import ImageFolder

    val = torch.stack([ImageFolder(val_dir, 64, train=False)[i]["pixels"] for i in range(4)])
    l1_fresh = float((ka.reconstruct(ka.create(cfg), val) - val).abs().mean())
    l1_trained = float((ka.reconstruct(ka.load(tmp_path / "run" / "export"), val) - val).abs().mean())
    assert l1_trained < 0.8 * l1_fresh, (l1_fresh, l1_trained)
    assert first["validation"]["l1"] == pytest.approx(l1_trained, rel=1e-4)


def _odd_files(d: Path) -> None:
    d.mkdir()
    rng = np.random.default_rng(0)
    base = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(base).save(d / "ok.png")
    Image.fromarray(base).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((rng.random((64, 64)) * 65535).astype(np.uint16)).save(d / "deep16.png")
    Image.fromarray(np.dstack([base, np.full((64, 64), 128, np.uint8)]), "RGBA").save(d / "alpha.png")
    buf = io.BytesIO()
    Image.fromarray(base).save(buf, "JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (d / "readme.jpg").write_text("not an image")
    Image.fromarray(base[:20, :20]).save(d / "tiny20.png")


def test_bad_files_are_skipped_named_and_counted(tmp_path):
    data = tmp_path / "odd"
    _odd_files(data)
    config = _config(tmp_path, train={"checkpoint_every": 100, "batch_size": 7}, data={"crop_sizes": [24]})
    r = subprocess.run(_cmd(config, data, tmp_path / "run", "--max-steps", "3"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("truncated.jpg", "readme.jpg", "tiny20.png"):
        assert name in r.stderr
    assert "tiny20.png: smaller than the 24px crop" in r.stderr  # the batch's crop size, not data.crop_size
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["skipped_files"] == 2
    assert set(Path(p).name for p in status["skipped_file_reasons"]) == {"truncated.jpg", "readme.jpg"}
    assert [Path(p).name for p in status["upscaled_files"]] == ["tiny20.png"]
    assert r.stderr.count("truncated.jpg") == 1  # one warning line per file, not one per epoch


def test_nonfinite_loss_skips_the_step(tmp_path, monkeypatch):
    from kl_autoencoder.training import losses

    original = losses.AutoencoderObjective.generator_loss

    def poisoned(self, x, xrec, mean, logvar, step, *a, **k):
        out = original(self, x, xrec, mean, logvar, step, *a, **k)
        return out._replace(loss=out.loss * float("nan")) if step == 1 else out

    monkeypatch.setattr(losses.AutoencoderObjective, "generator_loss", poisoned)
    cfg = load_config(_config(tmp_path, train={"checkpoint_every": 100}))
    cfg = cfg.replace(train=dataclasses.replace(cfg.train, max_steps=3))
    status = train(cfg, _photo_dir(tmp_path), tmp_path / "run")
    assert status["skipped_nonfinite"] == 1


def test_missing_lpips_weights_stop_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    config = _config(tmp_path, loss={"perceptual": "lpips-vgg"})
    r = subprocess.run(_cmd(config, _photo_dir(tmp_path), tmp_path / "run", "--max-steps", "2"), capture_output=True, text=True)
    assert r.returncode == 2
    assert "vgg16-397923af.pth" in r.stderr and "Traceback" not in r.stderr and "urllib" not in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_dry_run_and_changed_config_refused(tmp_path):
    config, data = _config(tmp_path), _photo_dir(tmp_path)
    r = subprocess.run(_cmd(config, data, tmp_path / "run", "--dry-run", "--set", "train.lr=1e-4"), capture_output=True, text=True)
    assert r.returncode == 0 and yaml.safe_load(r.stdout)["train"]["lr"] == pytest.approx(1e-4)
    assert not (tmp_path / "run").exists()
    subprocess.run(_cmd(config, data, tmp_path / "run", "--max-steps", "1"), check=True, capture_output=True)
    r = subprocess.run(_cmd(config, data, tmp_path / "run", "--max-steps", "2", "--set", "train.lr=5e-4"), capture_output=True, text=True)
    assert r.returncode == 2 and "train.lr" in r.stderr


def test_export_holds_ema_or_live_weights_as_configured(tmp_path):
    """train.export_ema (issue 18): the export is the EMA by default, the live weights with export_ema=false, and
    a finished run re-run with only that changed re-exports (no training step), checked against the checkpoint."""
    from diffusers import AutoencoderKL

    config, data = _config(tmp_path, train={"ema_decay": 0.5}, loss={"disc_start": 1000}), _photo_dir(tmp_path)
    out = tmp_path / "run"
    subprocess.run(_cmd(config, data, out, "--max-steps", "3"), check=True, capture_output=True)
    ck, losses = _final(out, 3), json.loads((out / "status.json").read_text())["losses"]
    assert losses, "a finished run reports its last losses"
    names = list(ck["vae"])  # the checkpoint's parameter order is the model's: the EMA's shadow list follows it
    params = [n for n in names if ck["vae"][n].dtype.is_floating_point][: len(ck["ema"]["shadow_params"])]
    exported = lambda: AutoencoderKL.from_pretrained(out / "export").state_dict()  # noqa: E731 - diffusers' reader
    ema, live = dict(zip(params, ck["ema"]["shadow_params"])), ck["vae"]
    differ = [n for n in params if not torch.equal(ema[n], live[n])]
    assert differ, "EMA 0.5 after 3 steps should differ from the live weights"
    got = exported()
    for n in differ:
        torch.testing.assert_close(got[n], ema[n], atol=0, rtol=0)
    r = subprocess.run(_cmd(config, data, out, "--max-steps", "3", "--set", "train.export_ema=false"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.equal(_final(out, 3)["vae"][differ[0]], live[differ[0]])  # no step was taken
    got = exported()
    for n in differ:
        torch.testing.assert_close(got[n], live[n], atol=0, rtol=0)
    assert "live weights exported" in (out / "export" / "README.md").read_text()
    assert json.loads((out / "status.json").read_text())["losses"] == losses  # kept although no step was logged


def test_bf16_mixed_precision_on_cpu_learns(tmp_path, monkeypatch, request):
    """train.mixed_precision=bf16 through accelerate: the forward runs under CPU bf16 autocast, the loss stays
    finite and falls (fp32 master weights, as accelerate keeps them)."""
    from accelerate.state import AcceleratorState

    from kl_autoencoder.training import run_log, step

    # accelerate keeps one AcceleratorState per process: earlier in-process tests made it with mixed_precision="no"
    AcceleratorState._reset_state(reset_partial_state=True)
    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))  # later tests start afresh
    config = _config(tmp_path, train={"mixed_precision": "bf16", "lr": 3e-3, "ema_decay": None, "batch_size": 2},
                     loss={"disc_start": 1000}, data={"crop_size": 32, "random_flip": False})
    data = tmp_path / "one"
    data.mkdir()
    sample_photos(32)[0].save(data / "a.png")  # one 32x32 photo, the whole crop: the loss can only fall by learning
    cfg = load_config(config, ["train.max_steps=32", "train.checkpoint_every=1000"])
    rec, dtypes = [], set()
    original_log = run_log.RunLog.log_step
    monkeypatch.setattr(run_log.RunLog, "log_step", lambda self, s, parts, *a, **k: (rec.append(float(parts[0].rec)), original_log(self, s, parts, *a, **k))[1])
    original_forward = step.AutoencoderStep.forward

    def forward(self, x, noise):
        out = original_forward(self, x, noise)
        dtypes.add(out[0].dtype)
        return out

    monkeypatch.setattr(step.AutoencoderStep, "forward", forward)
    status = train(cfg, data, tmp_path / "run")
    assert status["step"] == 32 and status["skipped_nonfinite"] == 0
    assert dtypes == {torch.bfloat16}  # the decoder's output came out of bf16 autocast
    weights = _final(tmp_path / "run", 32)["vae"]
    assert {t.dtype for t in weights.values()} == {torch.float32}  # ... while the weights stayed fp32
    assert all(np.isfinite(rec))
    assert np.mean(rec[-8:]) < 0.85 * np.mean(rec[:8]), rec


def test_crop_sizes_change_per_micro_batch_alike_in_every_process(tmp_path):
    """data.crop_sizes (issue 18): one size per micro-batch, the same in both ranks, all sizes used; training runs on it."""
    from kl_autoencoder.training.data import ImageFolder, StreamSampler, collate

    data = _photo_dir(tmp_path)
    ds = ImageFolder(data, 32, crop_sizes=(16, 24, 32), seed=3)
    ranks = [list(zip(range(12 * 2), StreamSampler(len(ds), 2, seed=3, rank=r, world_size=2))) for r in range(2)]
    sizes = {}
    for r, keys in enumerate(ranks):
        for j, (_, key) in enumerate(keys):
            sample = ds[key]
            assert sample["pixels"].shape[1:] == (ds.size_of(key[2]),) * 2
            sizes.setdefault(key[2], set()).add(sample["pixels"].shape[-1])
    assert all(len(s) == 1 for s in sizes.values()), sizes  # one size per micro-batch, whichever process
    assert {s.pop() for s in sizes.values()} == {16, 24, 32}
    assert collate([ds[k] for _, k in ranks[0][:2]])["pixels"].shape[0] == 2  # a micro-batch stacks
    assert ds[(0, 0)]["pixels"].shape[-1] == 32  # keys without a micro-batch: crop_size
    cfg = load_config(_config(tmp_path, data={"crop_size": 32, "crop_sizes": [16, 32]}, train={"checkpoint_every": 100},
                              loss={"disc_start": 1000}))  # PatchGAN needs >= 24 px
    status = train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=4)), data, tmp_path / "run")
    assert status["step"] == 4 and np.isfinite(status["losses"]["loss"])
