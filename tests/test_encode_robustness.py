"""The encode job where it meets users' machines (issues 15 and 19): out of memory halves the batch, the
encoder's dtype and the stored dtype are separate flags, one job per output folder, a full disk and
damaged cache files are one line each and lose nothing, inputs that cannot be encoded are listed."""

from __future__ import annotations

import errno
import json
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
from kl_autoencoder.errors import InputError
from kl_autoencoder.latents import encoding as encoding_mod
from kl_autoencoder.latents import shards as shards_mod
from kl_autoencoder.latents.dataset import LatentDataset
from kl_autoencoder.latents.format import CacheMismatchError
from kl_autoencoder.latents.writer import encode_dataset

from conftest import MICRO, perturb


def _folder(root: Path, n: int, size: tuple[int, int] = (40, 48)) -> list[Path]:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        files.append(root / f"img{i:02d}.png")
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(files[-1])
    return files


def _expected(vae: torch.nn.Module, path: Path, n: int = 32) -> torch.Tensor:
    """Posterior mean of the centre n x n crop, computed from diffusers' encoder directly."""
    im = Image.open(path).convert("RGB")
    s = min(im.size)
    left, top = (im.width - s) // 2, (im.height - s) // 2
    crop = im.crop((left, top, left + s, top + s)).resize((n, n), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, n, n)
    with torch.no_grad():
        return vae.encode(x.to(next(vae.parameters()).dtype)).latent_dist.mean.float()[0]  # (C, n/8, n/8)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_out_of_memory_halves_the_batch_and_loses_nothing(tmp_path, monkeypatch):
    vae = perturb(ka.create(MICRO)).eval()
    files = _folder(tmp_path / "data", 7)
    real = encoding_mod.encode_moments
    calls = []

    def tight_memory(vae_, x, **kw):  # a device that holds at most two images at a time
        calls.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(vae_, x, **kw)

    monkeypatch.setattr(encoding_mod, "encode_moments", tight_memory)
    res = encode_dataset(vae, tmp_path / "data", tmp_path / "out", resolution=32, batch_size=8, num_workers=0, progress=False)
    assert res.n_encoded == 7 and max(c for c in calls if c <= 2) == 2
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["oom_halvings"] == 3  # 7 -> 4 + 3, 4 -> 2 + 2, 3 -> 2 + 1
    ds = LatentDataset(tmp_path / "out")
    for i, f in enumerate(files):
        mean, _ = ds.moments(i)
        torch.testing.assert_close(mean, _expected(vae, f), atol=1e-5, rtol=0)


def test_dtype_runs_the_encoder_and_latent_dtype_stores(tmp_path, monkeypatch):
    vae = perturb(ka.create(MICRO)).eval()
    model = tmp_path / "model"
    ka.export(vae, model)
    files = _folder(tmp_path / "data", 2)
    real, seen = encoding_mod.encode_moments, []

    def spy(vae_, x, **kw):
        seen.append(next(vae_.parameters()).dtype)
        return real(vae_, x, **kw)

    monkeypatch.setattr(encoding_mod, "encode_moments", spy)
    assert cli.main(["encode", str(model), str(tmp_path / "data"), str(tmp_path / "out"), "--resolution", "32",
                     "--num-workers", "0", "--dtype", "bf16", "--latent-dtype", "fp16", "--device", "cpu"]) == 0
    from kl_autoencoder.inference import bf16

    # the encoder ran in bf16 (in fp32 on a CPU without native bf16: inference/fastconv.py says why)
    assert seen and set(seen) == {torch.bfloat16 if bf16.supported() else torch.float32}
    ds = LatentDataset(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["dtype"] == "fp16"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / ds.samples[0]["shard"]), framework="pt") as f:
        assert f.get_tensor(f"{ds.samples[0]['key']}.mean").dtype == torch.float16  # ... and fp16 was stored
    mean, _ = ds.moments(0)
    torch.testing.assert_close(mean, _expected(ka.load(model), files[0]), atol=5e-2, rtol=0)  # bf16's precision


GO = """
import pathlib, sys, time
from kl_autoencoder import cli            # the slow part (torch, diffusers) before the start signal
print("ready", flush=True)
go = pathlib.Path(sys.argv[1])
while not go.exists():
    time.sleep(0.005)
sys.exit(cli.main(sys.argv[2:]))
"""


def test_two_encodes_into_one_folder_exactly_one_runs(tmp_path):
    """Two encode commands released together on one OUT, asking for different stored dtypes: exactly one
    runs, the other exits 2 naming the lock's holder; every shard and the manifest have the winner's dtype."""
    vae = perturb(ka.create(MICRO))
    model = tmp_path / "model"
    ka.export(vae, model)
    files = _folder(tmp_path / "data", 48, size=(64, 64))
    go = tmp_path / "go"
    procs = {}
    for dtype in ("fp32", "fp16"):
        cmd = [sys.executable, "-c", GO, str(go), "encode", str(model), str(tmp_path / "data"), str(tmp_path / "out"),
               "--resolution", "64", "--num-workers", "0", "--batch-size", "1", "--shard-size", "2", "--latent-dtype", dtype]
        procs[dtype] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert all(p.stdout.readline().strip() == "ready" for p in procs.values())
    go.touch()  # both have imported everything: they reach the lock within milliseconds of each other
    results = {d: (p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for d, p in procs.items()}
    assert sorted(code for code, _, _ in results.values()) == [0, 2], results
    winner = next(d for d, (code, _, _) in results.items() if code == 0)
    loser = next(d for d in results if d != winner)
    err = results[loser][2]
    assert "Traceback" not in err and "in use by another encode job" in err and f"PID {procs[winner].pid}" in err, err
    ds = LatentDataset(tmp_path / "out")
    assert ds.manifest["dtype"] == winner and sorted(s["path"] for s in ds.samples) == [f.name for f in files]
    want = {"fp32": torch.float32, "fp16": torch.float16}[winner]
    for shard in (tmp_path / "out").glob("shard-*.safetensors"):
        assert {t.dtype for t in load_file(str(shard)).values()} == {want}, shard  # one dtype throughout
    torch.testing.assert_close(ds.moments(5)[0], _expected(vae.eval(), files[5], 64), atol=2e-3, rtol=0)


def test_full_disk_is_one_line_and_a_rerun_resumes(tmp_path, monkeypatch, capsys):
    vae = perturb(ka.create(MICRO))
    model = tmp_path / "model"
    ka.export(vae, model)
    _folder(tmp_path / "data", 6)
    real, writes = shards_mod.save_file, []

    def disk_fills_up(tensors, filename, metadata=None):
        writes.append(filename)
        if len(writes) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(shards_mod, "save_file", disk_fills_up)
    argv = ["encode", str(model), str(tmp_path / "data"), str(tmp_path / "out"), "--resolution", "32",
            "--num-workers", "0", "--batch-size", "2", "--shard-size", "2"]
    assert cli.main(argv) == 2
    line = _error_line(capsys)
    assert "disk full" in line and "shard-r000-000001" in line and "run the same command again" in line
    out = tmp_path / "out"
    assert [p.name for p in out.glob("shard-*")] == ["shard-r000-000000.safetensors"]  # the finished shard kept
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.tmp"))  # no half-written file left
    monkeypatch.setattr(shards_mod, "save_file", real)
    assert cli.main(argv) == 0
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert (counts["samples"], counts["unchanged"], counts["encoded"]) == (6, 2, 4)


def test_damaged_cache_files_are_one_line(tmp_path, capsys):
    vae = perturb(ka.create(MICRO))
    other = perturb(ka.create(MICRO), seed=7)
    model = tmp_path / "model"
    ka.export(vae, model)
    _folder(tmp_path / "data", 4)
    out, out2 = tmp_path / "out", tmp_path / "out2"
    encode_dataset(vae, tmp_path / "data", out, resolution=32, shard_size=2, num_workers=0, progress=False)
    encode_dataset(other, tmp_path / "data", out2, resolution=32, shard_size=2, num_workers=0, progress=False)

    # a shard of another model's cache under a name the manifest lists: refused when read, naming it
    shard = out / "shard-r000-000001.safetensors"
    saved = shard.read_bytes()
    shard.write_bytes((out2 / shard.name).read_bytes())
    ds = LatentDataset(out)
    ds.moments(0)  # the first shard is this cache's own
    with pytest.raises(CacheMismatchError, match=r"shard-r000-000001.*model_sha256"):
        ds.moments(3)
    shard.write_bytes(saved)

    # a file named like a shard that is not safetensors: encode refuses in one line naming it, changes nothing
    junk = out / "shard-r000-000009.safetensors"
    junk.write_bytes(b"this is not a safetensors file")
    def files() -> dict[str, bytes]:  # the lock file of filelock comes and goes; everything else must stay
        return {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".kl-autoencoder.lock")}

    before = files()
    assert cli.main(["encode", str(model), str(tmp_path / "data"), str(out), "--resolution", "32", "--num-workers", "0"]) == 2
    assert junk.name in _error_line(capsys)
    assert files() == before
    junk.unlink()

    # a manifest cut short: reading says so in one line; the same encode again rewrites it, encoding nothing
    manifest = out / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])
    with pytest.raises(InputError, match="not valid JSON.*run the same encode command again"):
        LatentDataset(out)
    assert cli.main(["encode", str(model), str(tmp_path / "data"), str(out), "--resolution", "32", "--num-workers", "0"]) == 0
    counts = json.loads(manifest.read_text())["counts"]
    assert (counts["samples"], counts["encoded"], counts["unchanged"]) == (4, 0, 4)


def test_what_cannot_be_encoded_is_listed_and_said(tmp_path, capsys, caplog):
    vae = perturb(ka.create(MICRO))
    model = tmp_path / "model"
    ka.export(vae, model)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_text("not an image")
    (bad / "b.jpg").write_bytes(b"")
    (bad / "notes.pdf").write_bytes(b"%PDF-1.4")
    code = cli.main(["encode", str(model), str(bad), str(tmp_path / "out"), "--resolution", "32", "--num-workers", "0"])
    assert code == 1 and "no sample could be encoded" in capsys.readouterr().err
    skipped = json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped"]
    assert sorted(s["path"] for s in skipped) == ["a.png", "b.jpg", "notes.pdf"]  # the folder scan's too

    with pytest.raises(SystemExit):
        cli.main(["encode", str(model), str(bad), str(tmp_path / "o2"), "--batch-size", "0"])
    assert "--batch-size" in capsys.readouterr().err
    assert cli.main(["encode", str(model), str(bad), str(tmp_path / "o3"), "--resolution", "0"]) == 2
    assert "positive multiple of 8" in _error_line(capsys)

    tiny = tmp_path / "tiny"
    tiny.mkdir()
    Image.new("RGB", (1, 1), (200, 30, 30)).save(tiny / "dot.png")
    assert cli.main(["encode", str(model), str(tiny), str(tmp_path / "o4"), "--resolution", "32", "--num-workers", "0"]) == 0
    assert "dot.png: 1x1 pixels, upscaled 32x" in caplog.text
