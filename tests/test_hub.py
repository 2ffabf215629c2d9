"""Hugging Face Hub ids as MODEL: resolved through huggingface_hub's cache, offline, as diffusers does.

Every test builds a local cache (tests/hub_cache.py, huggingface_hub's documented layout) of tiny models and
points HF_HUB_CACHE / HF_HOME at it; HF_HUB_OFFLINE=1 or --offline keeps everything off the network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kl_autoencoder as ka
from kl_autoencoder import cli
from kl_autoencoder.convert import HubError, looks_like_repo_id
from kl_autoencoder.cli.common import looks_like_model

from hub_cache import cache_repo, folder_files

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def hub(tmp_path, micro_vae, micro_vae_c16):
    """A cache with org/tiny-vae (a VAE repo) and org/tiny-pipeline (model_index.json + vae/ + unet/)."""
    cache = tmp_path / "hf-home" / "hub"
    vae_dir = ka.export(micro_vae, tmp_path / "src-vae")
    cache_repo(cache, "org/tiny-vae", folder_files(vae_dir))
    pipe_vae = ka.export(micro_vae_c16, tmp_path / "src-pipe-vae")
    files = folder_files(pipe_vae, "vae/")
    files["model_index.json"] = json.dumps({"_class_name": "StableDiffusion3Pipeline", "vae": ["diffusers", "AutoencoderKL"]}).encode()
    files["unet/config.json"] = b'{"_class_name": "UNet2DConditionModel", "in_channels": 16}'
    cache_repo(cache, "org/tiny-pipeline", files)
    return {"cache": cache, "home": cache.parent, "vae": micro_vae, "pipe_vae": micro_vae_c16}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), **extra)
    return env


def _offline(monkeypatch, cache: Path) -> None:
    """In this process: huggingface_hub's cache constant (read at its import) -> ``cache``, and HF_HUB_OFFLINE=1."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_test_cache_is_what_huggingface_hub_reads(hub):
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(hub["cache"])
    repos = {r.repo_id: r for r in info.repos}
    assert set(repos) == {"org/tiny-vae", "org/tiny-pipeline"} and not info.warnings
    files = {f.file_name for rev in repos["org/tiny-pipeline"].revisions for f in rev.files}
    assert {"config.json", "diffusion_pytorch_model.safetensors", "model_index.json"} <= files
    assert {r.refs for r in repos["org/tiny-vae"].revisions} == {frozenset({"main"})}


def test_cli_encode_hub_id_offline(hub, tmp_path, photos):
    """Must-show 1: `kl-autoencoder encode org/tiny-vae DATA OUT` with HF_HUB_OFFLINE=1 and only the cache."""
    data = tmp_path / "data"
    data.mkdir()
    for i, im in enumerate(photos[:2]):
        im.save(data / f"{i}.png")
    out = tmp_path / "latents"
    r = subprocess.run([sys.executable, "-m", "kl_autoencoder.cli", "encode", "org/tiny-vae", str(data), str(out),
                        "--resolution", "64", "--num-workers", "0"],
                       env=_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub["cache"])), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ds = ka.LatentDataset(out)
    assert ds.manifest["model"] == "org/tiny-vae" and len(ds) == 2
    want = ka.encode(hub["vae"], photos[0], tiling="never")[0]  # the model the cache holds, encoded here
    torch.testing.assert_close(ds[0]["latents"], want, atol=1e-4, rtol=0)  # the CLI runs fast convolutions


def test_ka_load_pipeline_repo_offline_equals_diffusers_from_pretrained(hub):
    """Must-show 1: ka.load("org/tiny-pipeline") (its vae/) with HF_HUB_OFFLINE=1 and HF_HOME, in a fresh
    process, gives the weights diffusers' own from_pretrained(..., subfolder="vae") reads from the same cache."""
    script = textwrap.dedent(
        """
        import hashlib, sys, torch
        import kl_autoencoder as ka
        from diffusers import AutoencoderKL
        ours = ka.load("org/tiny-pipeline")
        theirs = AutoencoderKL.from_pretrained("org/tiny-pipeline", subfolder="vae")  # HF_HUB_OFFLINE: cache only
        a, b = ours.state_dict(), theirs.state_dict()
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
        print(ours.config.latent_channels, ours.config.scaling_factor, ours.config.shift_factor)
        """
    )
    r = subprocess.run([sys.executable, "-c", script], env=_env(HF_HUB_OFFLINE="1", HF_HOME=str(hub["home"])),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["16", "1.5", "0.1"]  # micro_vae_c16's config


def test_missing_repo_offline_is_one_line(hub, tmp_path, photos):
    """Must-show 1: a repo not in the cache, offline: one line naming the repo and the missing files."""
    data = tmp_path / "data"
    data.mkdir()
    photos[0].save(data / "a.png")
    r = subprocess.run([sys.executable, "-m", "kl_autoencoder.cli", "encode", "org/not-cached", str(data), str(tmp_path / "o")],
                       env=_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub["cache"])), capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: org/not-cached")
    assert "config.json or vae/config.json" in lines[0] and "offline" in lines[0] and str(hub["cache"]) in lines[0]
    assert not (tmp_path / "o").exists()


def test_cached_config_without_weights_names_the_weights(hub, tmp_path, monkeypatch, micro_vae):
    folder = ka.export(micro_vae, tmp_path / "v")
    cache_repo(hub["cache"], "org/half-cached", {"config.json": folder / "config.json"})
    _offline(monkeypatch, hub["cache"])
    with pytest.raises(HubError) as e:
        ka.load("org/half-cached")
    assert "org/half-cached" in str(e.value) and "diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin" in str(e.value)
    assert "\n" not in str(e.value)


def test_offline_flag_never_touches_the_network(hub, monkeypatch, tmp_path, photos):
    """--offline without HF_HUB_OFFLINE: huggingface_hub is asked for local files only (its HTTP calls would raise)."""
    import huggingface_hub.file_download as fd
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def no_network(*a, **k):
        raise AssertionError("network used")

    real = fd._get_metadata_or_catch_error

    def local_only(**kw):  # huggingface_hub's metadata step: returns at once when local_files_only is set
        assert kw["local_files_only"], "asked the Hub"
        return real(**kw)

    monkeypatch.setattr(fd, "get_hf_file_metadata", no_network)
    monkeypatch.setattr(fd, "_get_metadata_or_catch_error", local_only)
    photos[0].save(tmp_path / "a.png")
    rc = cli.main(["reconstruct", "org/tiny-vae", str(tmp_path / "a.png"), "--out", str(tmp_path / "rec"), "--offline"])
    assert rc == 0 and (tmp_path / "rec").is_dir()
    assert cli.main(["export", "org/not-here", str(tmp_path / "x"), "--offline"]) == 2
    assert not (tmp_path / "x").exists()


def test_revision_picks_the_commit_its_ref_names(hub, tmp_path, monkeypatch, micro_vae):
    other = ka.export(ka.create(ka.config.ModelConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                                                      scaling_factor=0.25)), tmp_path / "other")
    commit = cache_repo(hub["cache"], "org/tiny-vae", folder_files(other), revision="v2")
    _offline(monkeypatch, hub["cache"])
    assert_same_state(ka.load("org/tiny-vae"), micro_vae)  # refs/main is untouched
    for rev in ("v2", commit):  # a ref name, or the commit hash itself
        v2 = ka.load("org/tiny-vae", revision=rev)
        assert v2.config.scaling_factor == 0.25 and tuple(v2.config.block_out_channels) == (8, 16)
    with pytest.raises(HubError, match="org/tiny-vae at revision nope"):
        ka.load("org/tiny-vae", revision="nope")


def test_local_paths_win_and_ids_are_recognised(tmp_path, micro_vae, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ka.export(micro_vae, tmp_path / "org" / "tiny-vae")  # a local folder with a repo-like name
    assert_same_state(ka.load("org/tiny-vae"), micro_vae)
    assert looks_like_repo_id("stabilityai/sd-vae-ft-mse") and looks_like_repo_id("black-forest-labs/FLUX.2-dev")
    for not_id in ("photo.jpg", "a/b/c", "/abs/path", "weights.safetensors", "dir/model.ckpt", "a/../b", "my.yaml"):
        assert not looks_like_repo_id(not_id), not_id
    assert looks_like_model("stabilityai/sd-vae-ft-mse") and not looks_like_model("photos/cat.jpg")
