"""Nothing lost, nothing mixed, one line per problem (issue 19): locks, checkpoint fallback, strict values,
standard output files. Each test names the finding it covers."""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import kl_autoencoder as ka
from kl_autoencoder import cli

from conftest import sample_photos


def _run_cli(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kl_autoencoder.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, errors="surrogateescape")


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    """The stderr of a refused command: exit 2, one 'error:' line, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


# ----------------------------------------------------------------------------- 1. one job per output folder

HOLD = textwrap.dedent("""
    import sys, time
    from kl_autoencoder.utils.locks import output_lock
    with output_lock(sys.argv[1], "test"):
        print("held", flush=True)
        time.sleep(60)
""")


def test_a_second_job_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(tmp_path):
    from kl_autoencoder.utils.locks import LockedError, output_lock

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(LockedError) as e:
        with output_lock(out, "encode"):
            pass
    assert f"PID {holder.pid}" in str(e.value) and str(out) in str(e.value)
    holder.send_signal(signal.SIGKILL)  # a lock left by a killed job ...
    holder.wait()
    with output_lock(out, "encode"):  # ... is taken over
        assert json.loads((out / ".kl-autoencoder.lock.json").read_text())["pid"] == os.getpid()


def test_two_trainers_in_one_run_directory(tmp_path):
    from test_train import _config, _photo_dir

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = _one_line_error(_run_cli("train", str(_config(tmp_path)), "--data", str(_photo_dir(tmp_path)),
                                        "--output", str(out), "--max-steps", "2"))
        assert f"PID {holder.pid}" in line and "train" in line
        assert not (out / "checkpoints").exists()  # nothing written by the refused job
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------- 2. checkpoints


def test_unreadable_checkpoints_are_set_aside_and_new_ones_kept(tmp_path):
    """Every checkpoint truncated: the rerun starts fresh once, keeps its own checkpoints (keep-last-N no longer
    counts the broken ones), a kill and a rerun continue from its newest readable one; the weights equal a
    fresh uninterrupted run's."""
    from test_train import _cmd, _config, _final, _photo_dir

    # keep 3: even if the kill below lands after the rerun's step 12, its own step 4 is still kept
    config, data = _config(tmp_path, train={"keep_checkpoints": 3}), _photo_dir(tmp_path)
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    subprocess.run(_cmd(config, data, run, "--max-steps", "12"), check=True, capture_output=True)
    for p in (run / "checkpoints").glob("step-*.pt"):  # 4, 8 and 12 (keep 3), all truncated
        p.write_bytes(p.read_bytes()[:1000])
    (run / "checkpoints" / ".step-00000016.pt.tmp").write_bytes(b"half a write")
    proc = subprocess.Popen(_cmd(config, data, run, "--max-steps", "16"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = run / "checkpoints"
    deadline = time.time() + 300
    while not ((ck / "step-00000008.pt.corrupt").exists() and (ck / "step-00000008.pt").exists()):  # its own step 8
        assert proc.poll() is None and time.time() < deadline, "the rerun ended before its own step-8 checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    names = sorted(p.name for p in ck.iterdir())
    assert "step-00000008.pt.corrupt" in names and "step-00000012.pt.corrupt" in names  # set aside, not deleted
    assert "step-00000004.pt" in names and ".step-00000016.pt.tmp" not in names  # its own new ones kept; temp gone
    newest = max(int(n[5:13]) for n in names if n.endswith(".pt") and _readable(ck / n))
    r = subprocess.run(_cmd(config, data, run, "--max-steps", "16"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"step-{newest:08d}.pt at step {newest}" in r.stderr and newest >= 8  # the newest readable state
    subprocess.run(_cmd(config, data, fresh, "--max-steps", "16"), check=True, capture_output=True)
    a, b = _final(fresh, 16), _final(run, 16)
    for name, t in a["vae"].items():
        torch.testing.assert_close(b["vae"][name], t, atol=1e-6, rtol=0)


def _readable(path: Path) -> bool:
    try:
        torch.load(path, weights_only=True)
        return True
    except Exception:  # noqa: BLE001
        return False


def test_disk_full_while_checkpointing_is_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch):
    from kl_autoencoder.errors import DiskFullError
    from kl_autoencoder.training import checkpoints

    def full(state, f):
        Path(f).write_bytes(b"x" * 4096)  # part of the file is written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", full)
    with pytest.raises(DiskFullError) as e:
        checkpoints.save_checkpoint(tmp_path, 5, {"w": torch.zeros(1000)})
    msg = str(e.value)
    assert "step-00000005.pt" in msg and "needs about 3.9 KiB" in msg and "run the same command again" in msg
    assert list((tmp_path / "checkpoints").iterdir()) == []


# ----------------------------------------------------------------------------- 3. file names that are not UTF-8


def _bytes_name_folder(tmp_path: Path) -> Path:
    d = tmp_path / "odd"
    d.mkdir()
    for i, im in enumerate(sample_photos(32)[:2]):
        im.save(d / f"p{i}.png")
    name = os.fsencode(d) + b"/caf\xe9.png"  # Latin-1 bytes: not UTF-8
    with open(name, "wb") as f:
        sample_photos(32)[2].save(f, format="PNG")
    return d


def test_score_and_eval_finish_with_a_non_utf8_file_name(micro_vae, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_weights"))
    monkeypatch.setattr(cli.common, "resolve_model", lambda spec, **kw: micro_vae)
    d = _bytes_name_folder(tmp_path)
    assert cli.main(["score", "micro", str(d), "--output", str(tmp_path / "s.csv")]) == 0
    with open(tmp_path / "s.csv", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and any(os.fsencode(r["file"]).endswith(b"caf\xe9.png") for r in rows)
    assert cli.main(["eval", "micro", str(d), "--output", str(tmp_path / "e"), "--no-compression"]) == 0
    report = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert report["n_images"] == 3 and (tmp_path / "e" / "metrics.md").stat().st_size > 0
    assert not [p for p in tmp_path.rglob("*.tmp")]


# ----------------------------------------------------------------------------- 4. one line, naming the file


def test_bad_latent_files_are_one_line(tmp_path):
    model = tmp_path / "model"
    ka.export(ka.create("tiny-kl-f8"), model)
    garbage, truncated, empty, pickled = (tmp_path / n for n in ("g.safetensors", "t.safetensors", "z.safetensors", "p.pt"))
    garbage.write_bytes(os.urandom(300))
    from safetensors.torch import save_file

    save_file({"latents": torch.randn(1, 4, 8, 8)}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    save_file({"latents": torch.zeros(2, 4, 0, 0)}, str(empty))
    pickled.write_bytes(b"\x80\x04cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85q\x01Rq\x02.")  # os.system("true")
    for f, words in ((garbage, "not a readable safetensors"), (truncated, "not a readable safetensors"),
                     (empty, "size 0"), (pickled, "refused")):
        line = _one_line_error(_run_cli("decode", str(model), str(f), str(tmp_path / f"out-{f.stem}")))
        assert str(f) in line and words in line, line


# ----------------------------------------------------------------------------- 6. no silent overwrite


def test_export_and_convert_refuse_an_existing_output(tmp_path):
    model = tmp_path / "model"
    ka.export(ka.create("tiny-kl-f8"), model)
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    line = _one_line_error(_run_cli("export", str(model), str(out)))
    assert "--force" in line and (out / "README.md").read_text() == "my notes"
    ldm = tmp_path / "vae.safetensors"
    ldm.write_bytes(b"precious")
    line = _one_line_error(_run_cli("convert", str(model), str(ldm), "--to", "ldm"))
    assert "--force" in line and ldm.read_bytes() == b"precious"
    assert _run_cli("export", str(model), str(out), "--force").returncode == 0
    assert (out / "config.json").is_file()


# ----------------------------------------------------------------------------- 7. standard output files


def test_eval_json_has_no_infinity_and_score_csv_starts_with_its_header(tmp_path, monkeypatch):
    """A flat image that comes back exactly: PSNR inf -> null plus a note, so json.loads(strict) reads it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_weights"))
    d = tmp_path / "flat"
    d.mkdir()
    Image.new("RGB", (32, 32), (128, 128, 128)).save(d / "flat.png")
    vae = ka.create("tiny-kl-f8")  # its decode patched to give the image back exactly
    monkeypatch.setattr("kl_autoencoder.evaluation.report.decode", lambda v, z, **kw: torch.zeros(1, 3, 32, 32) + (128 / 127.5 - 1))
    report = ka.evaluate(vae, d, tmp_path / "e", compression=False, progress=False)
    text = (tmp_path / "e" / "metrics.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["psnr"] is None and data["per_image"][0]["psnr"] is None and "infinite PSNR" in data["notes"][0]
    assert report["n_images"] == 1


# ----------------------------------------------------------------------------- 8. values checked before any work


@pytest.mark.parametrize("argv", [["decode", "tiny-kl-f8", "x.safetensors", "out", "--batch-size", "0"],
                                  ["train", "tiny-kl-f8", "--data", "d", "--output", "o", "--max-steps", "-5"],
                                  ["eval", "tiny-kl-f8", "d", "--output", "o", "--size", "0"],
                                  ["score", "tiny-kl-f8", "d", "--output", "o.csv", "--sigma", "-1"]])
def test_bad_numbers_are_refused_at_parse_time(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "must be" in err and "Traceback" not in err


def test_symlink_loops_and_unsupported_files_are_listed(tmp_path, caplog):
    from kl_autoencoder.utils.images import find_images

    d = tmp_path / "d"
    d.mkdir()
    sample_photos(32)[0].save(d / "ok.png")
    (d / "loop.png").symlink_to(d / "loop.png")
    (d / "clip.gif").write_bytes(b"GIF89a")
    (d / "ok.txt").write_text("a caption: a sidecar, not a skipped file")
    assert find_images(d) == [d / "ok.png"]
    logged = caplog.text
    assert "loop.png: unreadable" in logged and "clip.gif: not an image type" in logged and "ok.txt" not in logged


# ----------------------------------------------------------------------------- 4 and 5: pickles and strict values

EVIL_PICKLE = b"\x80\x04cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85q\x01Rq\x02."  # os.system("true") when unpickled


def test_a_pickle_that_needs_code_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "m"
    ka.create("tiny-kl-f8").save_pretrained(folder, safe_serialization=False)
    (folder / "diffusion_pytorch_model.bin").write_bytes(EVIL_PICKLE)
    line = _one_line_error(_run_cli("reconstruct", str(folder), str(tmp_path / "x.png"), "--out", str(tmp_path / "r")))
    assert "diffusion_pytorch_model.bin" in line and "refused" in line and "nothing was run" in line
    Image.new("RGB", (16, 16)).save(tmp_path / "img.png")
    (tmp_path / "vgg16-397923af.pth").write_bytes(EVIL_PICKLE)
    line = _one_line_error(_run_cli("eval", "tiny-kl-f8", str(tmp_path / "img.png"), "--output", str(tmp_path / "e"),
                                    "--lpips-weights", str(tmp_path / "vgg16-397923af.pth")))
    assert "vgg16-397923af.pth" in line and "refused" in line


@pytest.mark.parametrize("kind", ["int32", "nan"])
@pytest.mark.parametrize("layout", ["ldm-file", "diffusers-folder"])
def test_converters_refuse_integer_and_nonfinite_weights(kind, layout, tmp_path):
    from safetensors.torch import load_file, save_file

    from kl_autoencoder.convert import CheckpointError, to_ldm_state_dict

    vae = ka.create("tiny-kl-f8")
    key = "decoder.conv_out.bias"
    if layout == "ldm-file":
        sd = {k: v.contiguous() for k, v in to_ldm_state_dict(vae).items()}
        path = tmp_path / "vae.safetensors"
    else:
        ka.export(vae, tmp_path / "folder")
        path = tmp_path / "folder"
        sd = load_file(str(path / "diffusion_pytorch_model.safetensors"))
    sd[key] = sd[key].to(torch.int32) if kind == "int32" else sd[key].clone().index_fill_(0, torch.tensor([0]), float("nan"))
    save_file(sd, str(path if layout == "ldm-file" else path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        ka.load(path)
    assert key in str(e.value)
    line = _one_line_error(_run_cli("convert", str(path), str(tmp_path / "out"), "--to", "diffusers"))
    assert key in line
    if kind == "nan":  # whoever needs it can still load it
        assert torch.isnan(ka.load(path, allow_nonfinite=True).decoder.conv_out.bias).any()
