"""Datasets as users keep them: webdataset tars, captions (metadata tables, sidecars), flips, several resolutions,
and `accelerate launch` over whole tars. Expected values come from the files and from webdataset's own reader."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import load_file

import kl_autoencoder as ka
from kl_autoencoder import cli
from kl_autoencoder.errors import InputError
from kl_autoencoder.latents import LatentDataset, encode_dataset, read_manifest

from dataset_utils import img2dataset_tar, jpeg, photo, read_with_webdataset, write_tar


def _centre_square(im: Image.Image, n: int) -> Image.Image:
    """The centre square of ``im`` resized to n x n (bicubic), computed here rather than by the package."""
    s = min(im.size)
    left, top = (im.width - s) // 2, (im.height - s) // 2
    crop = im.crop((left, top, left + s, top + s))
    return crop if crop.size == (n, n) else crop.resize((n, n), Image.BICUBIC)


def _moments(vae: torch.nn.Module, im: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, logvar), each (1, C, h, w), from diffusers' own encoder and posterior, not the package's."""
    x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    return dist.mean, dist.logvar


def _shards(out: Path) -> list[Path]:
    return sorted(out.glob("shard-*.safetensors")) if out.is_dir() else []


def _stored_paths(out: Path) -> list[str]:
    """Sample paths in every live shard's header, read with safetensors (duplicates would show twice)."""
    m = read_manifest(out)
    paths = []
    for name in m["shards"]:
        with safe_open(str(out / name), framework="pt") as f:
            paths += [s["path"] for s in json.loads(f.metadata()["samples"])]
    return sorted(paths)


def _check_against_webdataset(micro_vae, out: Path, expected: dict[str, dict], resolution: int, n_latents: int = 3) -> None:
    ds = LatentDataset(out)
    for i in range(len(ds)):
        it = ds[i]
        want = expected[it["path"]]
        assert it["caption"] == want["caption"] and it["metadata"] == want["metadata"], it["path"]
    for i in range(0, len(ds), max(1, len(ds) // n_latents)):
        img = Image.open(io.BytesIO(expected[ds.samples[i]["path"]]["jpg"])).convert("RGB")
        mean, logvar = _moments(micro_vae, _centre_square(img, resolution))
        got_mean, got_logvar = ds.moments(i)
        torch.testing.assert_close(got_mean, mean[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(got_logvar, logvar[0], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- webdataset tars


def test_img2dataset_tars_survive_three_kills_and_reencode_only_a_changed_tar(micro_vae, tmp_path):
    tars = tmp_path / "tars"
    for s in range(3):
        img2dataset_tar(tars / f"{s:05d}.tar", s, 8, corrupt={5} if s == 1 else set(), no_caption={2} if s == 2 else set())
    spec = str(tars / "{00000..00002}.tar")
    expected = read_with_webdataset(spec)  # webdataset's own reader
    assert len(expected) == 24 and expected["00002.tar/000020002"]["caption"] == ""
    corrupt = "00001.tar/000010005"
    valid = sorted(p for p in expected if p != corrupt)
    out = tmp_path / "out"
    kw = dict(resolution=64, batch_size=1, shard_size=1, num_workers=0, progress=False)

    # three real SIGKILLs of a child process at random points: after a random number of shards, plus jitter
    # spawn, not fork: a child forked from a process whose OpenMP pool has run hangs in its first parallel op
    rng, spawn = random.Random(20261130), multiprocessing.get_context("spawn")
    at_kill = []
    for target in sorted(rng.sample(range(2, len(valid) - 2), 3)):
        child = spawn.Process(target=encode_dataset, args=(micro_vae, spec, out), kwargs=kw)
        child.start()
        deadline = time.monotonic() + 120
        while len(_shards(out)) < target and child.is_alive() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert len(_shards(out)) >= target, "the encode child made no progress"
        time.sleep(rng.uniform(0.0, 0.03))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL, "the job finished before it was killed"
        at_kill.append(len(_shards(out)))
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    assert at_kill[-1] < len(valid), at_kill

    r = encode_dataset(micro_vae, spec, out, **kw)  # the same call again
    m = read_manifest(out)
    assert [s["path"] for s in m["samples"]] == valid  # every valid sample exactly once
    assert _stored_paths(out) == valid  # and stored once
    assert r.n_unchanged >= at_kill[-1] - 1 and r.n_unchanged + r.n_encoded == len(valid)
    assert [s["path"] for s in m["skipped"]] == [corrupt]
    assert "00001.tar/000010005.jpg" in m["skipped"][0]["reason"]  # the tar and the key of the corrupt member
    assert m["counts"]["no_caption"] == 1 and m["counts"]["skipped"] == 1
    assert not list(out.glob(".*.tmp")) and sorted(p.name for p in _shards(out)) == m["shards"]
    for name in m["shards"]:
        load_file(str(out / name))  # every shard whole
    _check_against_webdataset(micro_vae, out, expected, 64)

    # one tar rewritten (new images and captions): only its samples are encoded again
    img2dataset_tar(tars / "00002.tar", 2, 8, seed=1, no_caption={2})
    expected = read_with_webdataset(spec)
    r = encode_dataset(micro_vae, spec, out, **kw)
    assert (r.n_encoded, r.n_unchanged, r.n_skipped) == (8, 15, 1)
    m2 = read_manifest(out)
    before = {s["path"]: s["shard"] for s in m["samples"]}
    moved = sorted(s["path"] for s in m2["samples"] if before[s["path"]] != s["shard"])
    assert moved == [p for p in valid if p.startswith("00002.tar/")]
    _check_against_webdataset(micro_vae, out, expected, 64, n_latents=8)


def test_damaged_tar_and_truncated_member_are_named_and_skipped(micro_vae, tmp_path, capfd):
    tars = tmp_path / "tars"
    img2dataset_tar(tars / "00000.tar", 0, 4)
    good = tars / "00000.tar"
    with tarfile.open(good) as t:
        cut = next(x for x in t.getmembers() if x.name == "000000002.jpg")
    data = good.read_bytes()
    (tars / "00001.tar").write_bytes(data[: cut.offset_data + cut.size // 2])  # truncated in the middle of a member
    whole = jpeg(photo(7))
    write_tar(tars / "00002.tar", [("a.jpg", whole[: len(whole) // 2]), ("a.txt", b"half a jpeg"),
                                   ("b.jpg", whole), ("b.txt", b"whole"), ("c.txt", b"no image here")])
    r = encode_dataset(micro_vae, str(tars / "*.tar"), tmp_path / "out", resolution=32, num_workers=1)
    m = read_manifest(tmp_path / "out")
    reasons = {s["path"]: s["reason"] for s in m["skipped"]}
    assert [s["path"] for s in m["samples"]] == [f"00000.tar/00000000{i}" for i in range(4)] + [
        "00001.tar/000000000", "00002.tar/b"]
    assert "damaged tar" in reasons["00001.tar"] and "unexpected end of data" in reasons["00001.tar"]
    assert "may be incomplete" in reasons["00001.tar/000000001"]
    assert reasons["00002.tar/a"].startswith("00002.tar/a.jpg: unreadable image")
    assert reasons["00002.tar/c"] == "00002.tar/c: no image member (has txt)"
    assert r.n_skipped == 4
    err = capfd.readouterr().err
    assert "img/s" in err and "skipped=4" in err  # the progress bar, also for tars


def test_tar_specs_brace_glob_list_folder_and_pipe_url(micro_vae, tmp_path):
    tars = tmp_path / "shards"
    for s in range(2):
        img2dataset_tar(tars / f"{s:05d}.tar", s, 2)
    kw = dict(resolution=32, num_workers=0, progress=False)
    specs = [str(tars / "{00000..00001}.tar"), str(tars / "0000?.tar"), f"{tars / '00000.tar'}::{tars / '00001.tar'}",
             str(tars), [str(tars / "00000.tar"), str(tars / "00001.tar")],
             f"pipe:cat {tars / '00000.tar'}::pipe:cat {tars / '00001.tar'}"]  # a URL webdataset opens itself
    want = sorted(read_with_webdataset(str(tars / "{00000..00001}.tar")))
    for i, spec in enumerate(specs):
        encode_dataset(micro_vae, spec, tmp_path / f"out{i}", **kw)
        assert [s["path"] for s in read_manifest(tmp_path / f"out{i}")["samples"]] == want, spec
    a, b = LatentDataset(tmp_path / "out0"), LatentDataset(tmp_path / "out5")
    assert all(torch.equal(a.moments(i)[0], b.moments(i)[0]) for i in range(len(a)))
    with pytest.raises(FileNotFoundError, match="00002.tar: no such tar"):
        encode_dataset(micro_vae, str(tars / "{00000..00002}.tar"), tmp_path / "bad", **kw)
    assert not (tmp_path / "bad").exists()  # refused before writing anything


# ----------------------------------------------------------------------------- captions of image folders


def _expected_from_table(table: Path, column: str) -> dict[str, tuple[str, dict]]:
    """Image path (relative to the dataset root) -> (caption, other columns), parsed here with json / csv."""
    rows = ([json.loads(line) for line in table.read_text().splitlines() if line.strip()] if table.suffix == ".jsonl"
            else list(csv.DictReader(table.read_text().splitlines())))
    base = table.parent.name + "/" if table.parent.name == "sub" else ""
    return {base + r.pop("file_name"): (r.pop(column, None) or "", r) for r in rows}


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_metadata_table_captions(micro_vae, tmp_path, kind):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    names = ["a.png", "b.jpg", "c.png", "sub/d.png", "sub/e.png"]
    for i, n in enumerate(names):
        photo(i, (64 + 8 * i, 72)).save(data / n)
    column = "text" if kind == "jsonl" else "prompt"
    rows_root = [{"file_name": "a.png", column: "a red fox, ümlaut", "aesthetic": 6.5},
                 {"file_name": "b.jpg", column: "  a jpeg with spaces  ", "aesthetic": 4.0}]  # c.png: no row
    rows_sub = [{"file_name": "d.png", column: "in a subfolder", "source": "x"}, {"file_name": "e.png", "source": "y"}]
    for folder, rows in [(data, rows_root), (data / "sub", rows_sub)]:
        if kind == "jsonl":
            (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            fields = sorted({k for r in rows for k in r})
            with open(folder / "metadata.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fields)
                w.writeheader()
                w.writerows(rows)
    encode_dataset(micro_vae, data, tmp_path / "out", resolution=32, num_workers=1, progress=False,
                   caption_key=None if kind == "jsonl" else "prompt")
    expected = {**_expected_from_table(data / f"metadata.{kind}", column),
                **_expected_from_table(data / "sub" / f"metadata.{kind}", column)}
    ds = LatentDataset(tmp_path / "out")
    got = {ds[i]["path"]: (ds[i]["caption"], ds[i]["metadata"]) for i in range(len(ds))}
    assert sorted(got) == sorted(names)
    for path, (caption, meta) in expected.items():
        assert got[path][0] == caption.strip() and got[path][1] == meta, path
    assert got["c.png"] == ("", {})
    assert ds.manifest["counts"]["no_caption"] == 2  # c.png (no row) and sub/e.png (no caption column)


def test_metadata_table_errors_name_file_and_line(micro_vae, tmp_path, capfd):
    data = tmp_path / "data"
    data.mkdir()
    photo(0).save(data / "a.png")
    (data / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png", "text": \n')
    with pytest.raises(InputError, match=r"metadata.jsonl line 2: not JSON"):
        encode_dataset(micro_vae, data, tmp_path / "out", resolution=32, num_workers=0, progress=False)
    (data / "metadata.jsonl").write_text('{"file_name": "a.png"}\n{"file_name": "gone.png", "text": "listed only"}\n')
    capfd.readouterr()
    r = encode_dataset(micro_vae, data, tmp_path / "out", resolution=32, num_workers=0)
    m = read_manifest(tmp_path / "out")
    assert r.n_samples == 1 and m["skipped"][0]["path"] == "gone.png" and "listed in a metadata table" in m["skipped"][0]["reason"]
    err = capfd.readouterr().err
    assert "2/2" in err and "img/s" in err and "skipped=1" in err  # the progress bar of a folder: a total, rate, skips


def test_sidecar_captions_and_recaption_without_reencoding(micro_vae, tmp_path):
    data = tmp_path / "data"
    (data / "d").mkdir(parents=True)
    for i, n in enumerate(["a.png", "b.png", "c.png", "d/e.jpg"]):
        photo(i).save(data / n)
    (data / "a.txt").write_text("caption of a\n")
    (data / "b.caption").write_text("kohya-style caption of b")
    (data / "c.json").write_text(json.dumps({"score": 0.5, "tags": ["x", "y"]}))
    (data / "d" / "e.txt").write_bytes("\ufeffcaption of e with a BOM".encode("utf-8"))
    encode_dataset(micro_vae, data, tmp_path / "out", resolution=32, num_workers=0, progress=False)
    ds = LatentDataset(tmp_path / "out")
    got = {ds[i]["path"]: ds[i]["caption"] for i in range(len(ds))}
    assert got == {"a.png": (data / "a.txt").read_text().strip(), "b.png": (data / "b.caption").read_text(),
                   "c.png": "", "d/e.jpg": (data / "d" / "e.txt").read_text(encoding="utf-8-sig")}
    assert ds[2]["metadata"] == json.loads((data / "c.json").read_text())
    assert ds.manifest["counts"]["no_caption"] == 1
    before = [ds.moments(i) for i in range(len(ds))]

    (data / "a.txt").write_text("a better caption of a")  # only the caption changes: no encoder call
    r = encode_dataset(micro_vae, data, tmp_path / "out", resolution=32, num_workers=0, progress=False)
    assert (r.n_encoded, r.n_recaptioned, r.n_unchanged) == (0, 1, 3)
    ds = LatentDataset(tmp_path / "out")
    assert ds[0]["caption"] == "a better caption of a"
    assert all(torch.equal(ds.moments(i)[k], before[i][k]) for i in range(len(ds)) for k in (0, 1))
    r = encode_dataset(micro_vae, data, tmp_path / "out", resolution=32, num_workers=0, progress=False)
    assert (r.n_encoded, r.n_recaptioned, r.n_unchanged) == (0, 0, 4)  # converged


# ----------------------------------------------------------------------------- flips and resolutions


def test_flip_both_stores_the_mirror_images_moments(micro_vae, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    photos = {f"p{i}.png": photo(10 + i, (72 + 16 * i, 64)) for i in range(3)}
    for n, im in photos.items():
        im.save(data / n)
    encode_dataset(micro_vae, data, tmp_path / "out", resolution=64, flip="both", num_workers=0, progress=False)
    ds = LatentDataset(tmp_path / "out")
    for i, s in enumerate(ds.samples):
        mirror = ImageOps.mirror(_centre_square(photos[s["path"]], 64))  # PIL's mirror, not the package's flip
        mean, logvar = _moments(micro_vae, mirror)
        got_mean, got_logvar = ds.moments(i, flip=True)
        torch.testing.assert_close(got_mean, mean[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(got_logvar, logvar[0], atol=1e-5, rtol=0)
        assert not torch.allclose(ds.moments(i)[0], got_mean, atol=1e-3)

    def draws(seed: int) -> list[tuple[bool, torch.Tensor]]:
        d = LatentDataset(tmp_path / "out", random_flip=True, seed=seed)
        out = []
        for epoch in range(8):
            d.set_epoch(epoch)
            out += [(d[i]["flip"], d[i]["latents"]) for i in range(len(d))]
        return out

    a, b, c = draws(3), draws(3), draws(4)
    assert [f for f, _ in a] == [f for f, _ in b] and all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b))
    assert 0 < sum(f for f, _ in a) < len(a) and [f for f, _ in a] != [f for f, _ in c]
    factor = ds.manifest["scaling_factor"]
    for k, (flipped, z) in enumerate(a[:6]):
        torch.testing.assert_close(z, ds.moments(k % len(ds), flip=flipped)[0] * factor, atol=0, rtol=0)
    encode_dataset(micro_vae, data, tmp_path / "plain", resolution=64, num_workers=0, progress=False)
    with pytest.raises(InputError, match="--flip both"):
        LatentDataset(tmp_path / "plain", random_flip=True)


def test_several_resolutions_in_one_cache(micro_vae, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    photos = {f"p{i}.png": photo(20 + i, (80, 64 + 24 * i)) for i in range(3)}
    for n, im in photos.items():
        im.save(data / n)
    assert cli.main(["encode", str(_export(micro_vae, tmp_path)), str(data), str(tmp_path / "out"), "--resolution",
                     "32,64", "--flip", "both", "--num-workers", "0"]) == 0
    m = read_manifest(tmp_path / "out")
    assert (m["resolutions"], m["resolution"], m["flip"]) == ([32, 64], 32, "both")
    with safe_open(str(tmp_path / "out" / m["samples"][0]["shard"]), framework="pt") as f:
        key = m["samples"][0]["key"]
        assert {f"{key}.mean", f"{key}.flip.mean", f"{key}@64.mean", f"{key}@64.flip.mean"} <= set(f.keys())
    for res in (32, 64):
        ds = LatentDataset(tmp_path / "out", resolution=res)
        for i, s in enumerate(ds.samples):
            crop = _centre_square(photos[s["path"]], res)
            for flipped, im in ((False, crop), (True, ImageOps.mirror(crop))):
                mean, _ = _moments(micro_vae, im)
                torch.testing.assert_close(ds.moments(i, flip=flipped)[0], mean[0], atol=1e-5, rtol=0)
            assert ds[i]["latents"].shape == (4, res // 8, res // 8) and ds[i]["bucket"] == (res, res)
    assert LatentDataset(tmp_path / "out")[0]["latents"].shape == (4, 4, 4)  # the first resolution by default
    with pytest.raises(InputError, match=r"no latents at resolution 48 \(stored: 32, 64\)"):
        LatentDataset(tmp_path / "out", resolution=48)


def _export(vae, tmp_path: Path) -> Path:
    model = tmp_path / "model"
    if not model.exists():
        ka.export(vae, model)
    return model


# ----------------------------------------------------------------------------- accelerate launch


def test_accelerate_two_processes_take_whole_tars(micro_vae, tmp_path):
    tars = tmp_path / "tars"
    for s in range(4):
        img2dataset_tar(tars / f"{s:05d}.tar", s, 3, no_caption={1} if s == 3 else set())
    spec = str(tars / "{00000..00003}.tar")
    model = _export(micro_vae, tmp_path)
    # `accelerate launch --multi_gpu` starts torchrun; on a machine without CUDA the processes join with gloo
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kl_autoencoder.cli", "encode", str(model), spec,
              str(tmp_path / "two"), "--resolution", "32", "--num-workers", "0", "--shard-size", "2"]
    env = dict(os.environ, PYTHONPATH=str(Path(ka.__file__).parent.parent))
    r = subprocess.run(launch, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    m = read_manifest(tmp_path / "two")
    expected = read_with_webdataset(spec)
    assert [s["path"] for s in m["samples"]] == sorted(expected) and m["counts"]["world_size"] == 2
    assert m["counts"]["no_caption"] == 1
    rank_of_tar: dict[str, set[str]] = {}
    for s in m["samples"]:
        rank_of_tar.setdefault(s["tar"], set()).add(s["shard"][: len("shard-r000")])
    assert all(len(ranks) == 1 for ranks in rank_of_tar.values()), rank_of_tar  # each tar encoded by one process
    assert sorted(r for ranks in rank_of_tar.values() for r in ranks) == ["shard-r000"] * 2 + ["shard-r001"] * 2
    encode_dataset(micro_vae, spec, tmp_path / "one", resolution=32, num_workers=0, progress=False)
    one, two = LatentDataset(tmp_path / "one"), LatentDataset(tmp_path / "two")
    for i in range(len(one)):
        torch.testing.assert_close(two.moments(i)[0], one.moments(i)[0], atol=1e-5, rtol=0)
        assert (two[i]["caption"], two[i]["metadata"]) == (expected[two[i]["path"]]["caption"], expected[two[i]["path"]]["metadata"])
