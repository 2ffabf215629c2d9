"""Latent caching: encode -> decode round trip, kill/resume, changed images, LatentDataset sampling."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import kl_autoencoder as ka
from kl_autoencoder import cli
from kl_autoencoder.latents.buckets import BucketBatchSampler
from kl_autoencoder.utils.images import find_images, tensor_to_uint8
from kl_autoencoder.latents.writer import CacheMismatchError, encode_dataset
from kl_autoencoder.latents.dataset import LatentDataset
from kl_autoencoder.latents.format import read_manifest
from kl_autoencoder.latents import decode_latents, read_latents

from conftest import sample_photos


def _photo_folder(root: Path) -> dict[str, Image.Image]:
    """Four real photos of different sizes and aspect ratios (one in a subfolder) plus one bad file."""
    root.mkdir(parents=True)
    (root / "sub").mkdir()
    out = {}
    for i, im in enumerate(sample_photos(None)):
        im = im.resize((im.width // 4, im.height // 4), Image.BICUBIC)  # 128x128, 100x150, 75x112, 106x160
        rel = f"sub/p{i}.png" if i % 2 else f"p{i}.png"
        im.save(root / rel)
        out[rel] = im
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return out


def _centre_square(im: Image.Image, n: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    s = min(im.size)
    box = ((im.width - s) // 2, (im.height - s) // 2, (im.width - s) // 2 + s, (im.height - s) // 2 + s)
    crop = im.crop(box)
    return (crop if crop.size == (n, n) else crop.resize((n, n), Image.BICUBIC)), box


def test_encode_decode_matches_reconstruct(micro_vae, tmp_path):
    photos = _photo_folder(tmp_path / "data")
    res = encode_dataset(micro_vae, tmp_path / "data", tmp_path / "out", resolution=64, batch_size=3, shard_size=3,
                         num_workers=0, progress=False)
    assert (res.n_inputs, res.n_samples, res.n_encoded, res.n_skipped) == (5, 4, 4, 1)
    m = read_manifest(tmp_path / "out")
    assert [s["path"] for s in m["samples"]] == sorted(photos)
    assert m["skipped"][0]["path"] == "broken.jpg" and "broken.jpg" in m["skipped"][0]["reason"]
    assert m["scaling_factor"] == 0.5 and m["identity"]["model_sha256"] == ka.latents.format.model_sha256(micro_vae)
    items, is_cache = read_latents(tmp_path / "out")
    assert is_cache and [n for n, _ in items] == ["p0", "p2", "sub/p1", "sub/p3"]
    for (name, z), s in zip(items, m["samples"]):
        im = photos[s["path"]]
        crop, box = _centre_square(im, 64)
        assert s["crop_box"] == list(box) and s["size"] == list(im.size) and s["flip"] is False
        assert s["sha256"] == hashlib.sha256((tmp_path / "data" / s["path"]).read_bytes()).hexdigest()
        expected = ka.reconstruct(micro_vae, crop)  # (1, 3, 64, 64)
        got = decode_latents(micro_vae, z[None], raw=True)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # the command writes PNGs named after the sources, equal to the reconstruction up to uint8 rounding
    model = tmp_path / "model"
    ka.export(micro_vae, model)
    assert cli.main(["decode", str(model), str(tmp_path / "out"), str(tmp_path / "png")]) == 0
    for s in m["samples"]:
        png = np.asarray(Image.open(tmp_path / "png" / (s["path"].rsplit(".", 1)[0] + ".png")), dtype=np.int16)
        ref = tensor_to_uint8(ka.reconstruct(micro_vae, _centre_square(photos[s["path"]], 64)[0]))[0].astype(np.int16)
        assert np.abs(png - ref).max() <= 1


def test_decode_tensor_files_and_errors(micro_vae, tmp_path, capsys):
    model = tmp_path / "model"
    ka.export(micro_vae, model)
    z = torch.randn(2, 4, 8, 8)
    torch.save(z, tmp_path / "norm.pt")
    assert cli.main(["decode", str(model), str(tmp_path / "norm.pt"), str(tmp_path / "a")]) == 0
    assert "normalised" in capsys.readouterr().out
    ref = tensor_to_uint8(ka.decode(micro_vae, z)).astype(np.int16)
    for i in range(2):
        assert np.abs(np.asarray(Image.open(tmp_path / "a" / f"{i:05d}.png"), dtype=np.int16) - ref[i]).max() <= 1
    from safetensors.torch import save_file

    save_file({"latents": z[0].contiguous()}, str(tmp_path / "raw.safetensors"))
    assert cli.main(["decode", str(model), str(tmp_path / "raw.safetensors"), str(tmp_path / "b"), "--raw"]) == 0
    assert "raw VAE latents" in capsys.readouterr().out
    ref = tensor_to_uint8(ka.decode(micro_vae, ka.normalize_latents(micro_vae, z[:1]))).astype(np.int16)
    assert np.abs(np.asarray(Image.open(tmp_path / "b" / "00000.png"), dtype=np.int16) - ref[0]).max() <= 1
    bad = z.clone()
    bad[1, 2, 3, 4] = float("nan")
    for name, t, msg in [("c3.pt", torch.randn(1, 3, 8, 8), "has 3 channels"), ("nan.pt", bad, "non-finite"),
                         ("rank.pt", torch.randn(4, 8), "expected latents shaped")]:
        torch.save(t, tmp_path / name)
        assert cli.main(["decode", str(model), str(tmp_path / name), str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err
        assert msg in err and name in err
    assert not (tmp_path / "c").exists()  # refused before writing anything


def _noise_folder(root: Path, n: int) -> None:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)).save(root / f"img{i:03d}.png")
    (root / "zz_bad.png").write_text("not an image")


def test_killed_encode_resumes_and_reencodes_only_changed(micro_vae, tmp_path):
    n = 60
    data, out, model = tmp_path / "data", tmp_path / "out", tmp_path / "model"
    _noise_folder(data, n)
    ka.export(micro_vae, model)
    cmd = [sys.executable, "-m", "kl_autoencoder.cli", "encode", str(model), str(data), str(out),
           "--resolution", "64", "--shard-size", "2", "--batch-size", "2", "--num-workers", "0"]
    env = dict(os.environ, PYTHONPATH=str(Path(ka.__file__).parent.parent))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("shard-*.safetensors")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    shards_at_kill = list(out.glob("shard-*.safetensors"))
    assert 1 <= len(shards_at_kill) < n // 2, "the job should have been killed part way"
    assert not json.loads((out / "manifest.json").read_text())["complete"]

    assert cli.main(cmd[3:]) == 0  # the same command again (in-process: a second interpreter start costs ~10 s here)
    m = read_manifest(out)
    valid = sorted(p.name for p in find_images(data) if p.name != "zz_bad.png")
    assert [s["path"] for s in m["samples"]] == valid  # every valid input exactly once, sorted
    assert [s["path"] for s in m["skipped"]] == ["zz_bad.png"]
    c = m["counts"]
    assert c["unchanged"] >= 2 and c["unchanged"] + c["encoded"] == n  # the first shard's work was kept
    assert sorted(p.name for p in out.glob("shard-*.safetensors")) == m["shards"]
    assert not list(out.glob(".*.tmp"))
    for shard in m["shards"]:
        load_file(str(out / shard))  # every shard is whole
    ds = LatentDataset(out)
    assert len(ds) == n and all(torch.isfinite(ds[i]["latents"]).all() for i in range(0, n, 17))

    # change one image's bytes: only it is encoded again, and its new latents match a direct encode
    new = Image.fromarray(np.random.default_rng(99).integers(0, 256, (72, 80, 3), dtype=np.uint8))  # not flat: GroupNorm of
    # a flat image divides ~0 by sqrt(eps), which turns float rounding into 1e-3 differences
    new.save(data / "img007.png")
    assert cli.main(cmd[3:]) == 0
    m2 = read_manifest(out)
    assert (m2["counts"]["encoded"], m2["counts"]["unchanged"]) == (1, n - 1)
    e = next(s for s in m2["samples"] if s["path"] == "img007.png")
    assert e["sha256"] == hashlib.sha256((data / "img007.png").read_bytes()).hexdigest()
    assert len(m2["samples"]) == n and e["shard"] not in m["shards"]
    mean, _ = ka.encode_moments(micro_vae, _centre_square(new, 64)[0])
    i = [s["path"] for s in m2["samples"]].index("img007.png")
    torch.testing.assert_close(LatentDataset(out).moments(i)[0], mean[0], atol=1e-5, rtol=0)
    for shard in m2["shards"]:
        load_file(str(out / shard))


def test_refuses_other_model_or_transform(micro_vae, micro_vae_c16, tmp_path):
    _noise_folder(tmp_path / "data", 3)
    kw = dict(batch_size=2, num_workers=0, progress=False)
    encode_dataset(micro_vae, tmp_path / "data", tmp_path / "out", resolution=64, **kw)
    with pytest.raises(CacheMismatchError, match="transform.*--overwrite"):
        encode_dataset(micro_vae, tmp_path / "data", tmp_path / "out", resolution=32, **kw)
    with pytest.raises(CacheMismatchError, match="model_sha256"):
        encode_dataset(micro_vae_c16, tmp_path / "data", tmp_path / "out", resolution=64, **kw)
    r = encode_dataset(micro_vae, tmp_path / "data", tmp_path / "out", resolution=32, overwrite=True, **kw)
    assert (r.n_encoded, r.n_samples) == (3, 3) and LatentDataset(tmp_path / "out")[0]["latents"].shape == (4, 4, 4)


def test_buckets_cache_and_batches(micro_vae, tmp_path):
    photos = _photo_folder(tmp_path / "data")
    encode_dataset(micro_vae, tmp_path / "data", tmp_path / "out", buckets=192 * 192, batch_size=2, num_workers=1,
                   dtype="fp16", progress=False)
    ds = LatentDataset(tmp_path / "out")
    assert ds.manifest["dtype"] == "fp16"
    for i in range(len(ds)):
        it = ds[i]
        w, h = it["bucket"]
        assert it["latents"].shape == (4, h // 8, w // 8) and it["latents"].dtype == torch.float32
        W, H = photos[it["path"]].size
        assert it["original_size"] == (W, H)
    # buckets of 192^2: (128, 256), (192, 192), (256, 128); the square photo -> square, the 3:2 ones -> 2:1
    assert {ds[i]["path"]: ds[i]["bucket"] for i in range(len(ds))} == {
        "p0.png": (192, 192), "p2.png": (256, 128), "sub/p1.png": (256, 128), "sub/p3.png": (256, 128)}
    loader = torch.utils.data.DataLoader(ds, batch_sampler=BucketBatchSampler(ds.buckets(), 2), collate_fn=ds.collate)
    seen = []
    for batch in loader:
        assert len({m["bucket"] for m in batch["meta"]}) == 1
        seen += [m["index"] for m in batch["meta"]]
    assert sorted(seen) == list(range(len(ds)))


def test_latent_dataset_sampling(micro_vae_c16, tmp_path):
    _photo_folder(tmp_path / "data")
    encode_dataset(micro_vae_c16, tmp_path / "data", tmp_path / "out", resolution=32, num_workers=0, progress=False)
    m = read_manifest(tmp_path / "out")
    assert (m["scaling_factor"], m["shift_factor"]) == (1.5, 0.1)
    s0 = m["samples"][0]
    stored = load_file(str(tmp_path / "out" / s0["shard"]))
    mean_n = (stored[f"{s0['key']}.mean"] - 0.1) * 1.5  # (16, 4, 4) normalised, computed here
    std_n = torch.exp(0.5 * stored[f"{s0['key']}.logvar"]) * 1.5

    assert torch.equal(LatentDataset(tmp_path / "out")[0]["latents"], mean_n)
    a, b = LatentDataset(tmp_path / "out", sample=True, seed=7), LatentDataset(tmp_path / "out", sample=True, seed=7)
    x = a[0]["latents"]
    assert torch.equal(x, b[0]["latents"]) and torch.equal(x, a[0]["latents"])
    assert not torch.equal(x, LatentDataset(tmp_path / "out", sample=True, seed=8)[0]["latents"])
    a.set_epoch(1)
    assert not torch.equal(x, a[0]["latents"])
    draws = []
    for epoch in range(800):
        a.set_epoch(epoch)
        draws.append(a[0]["latents"])
    draws = torch.stack(draws)  # (800, 16, 4, 4)
    err = (draws.mean(0) - mean_n).abs() / (std_n / 800**0.5)
    assert err.max() < 5.0  # within 5 standard errors everywhere
    ratio = draws.std(0) / std_n
    assert 0.9 < float(ratio.mean()) < 1.1
