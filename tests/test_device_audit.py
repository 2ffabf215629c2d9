"""Device audit without a GPU: every path runs on a fake CUDA device, where a CPU tensor mixed in raises.

``FakeTensorMode`` builds diffusers models on a fake ``cuda`` device on this CPU machine and runs their
forward passes on shapes alone; any computation that mixes a tensor on the CPU with one on ``cuda`` raises
``FakeTensorDeviceMismatchError``, exactly where a real single GPU would raise. Backward does not run
under it, so the training objective is audited up to the loss (and the adaptive weight's inputs).

Models and inputs are built under ``torch.device("cuda")`` (``on_gpu``: a fake model cannot be moved with
``Module.to``), but the calls under audit run with the CPU as default device, as in real use: a tensor our
code makes without ``device=`` lands on the CPU and the mix raises.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode

import kl_autoencoder as ka
from kl_autoencoder.config import LossConfig
from kl_autoencoder.inference import memory_plan
from kl_autoencoder.training.losses import AutoencoderObjective
from kl_autoencoder.training.step import AutoencoderStep, posterior_noise

from conftest import MICRO, sample_photos

GIB = 1 << 30


@contextlib.contextmanager
def fake_cuda(monkeypatch, free: int = 8 * GIB):
    """A fake CUDA device with ``free`` bytes (torch.cuda.mem_get_info would ask a real driver); the default
    device stays the CPU (build models and inputs inside ``on_gpu()``)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    with FakeTensorMode(allow_non_fake_inputs=True):
        yield


def on_gpu() -> contextlib.AbstractContextManager:
    """Build on the fake GPU: parameters and inputs made inside land on ``cuda``."""
    return torch.device("cuda")


def _buffers_to_cuda(module: torch.nn.Module) -> torch.nn.Module:
    """What the trainer's ``objective.to(acc.device)`` does to buffers made on the CPU (lpips' ScalingLayer builds
    its shift/scale with ``torch.Tensor([...])``, which ignores the default device); under FakeTensorMode
    ``Module.to`` cannot swap the (already fake-cuda) parameters, so the buffers are moved one by one."""
    for m in module.modules():
        for k, b in list(m._buffers.items()):
            if b is not None and b.device.type != "cuda":
                m._buffers[k] = b.to("cuda")
    return module


def _on_cuda(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cuda" for t in tensors)


def test_the_audit_catches_a_cpu_tensor_in_a_cuda_computation(monkeypatch):
    with fake_cuda(monkeypatch):
        with on_gpu():
            cuda = torch.ones(3)
        with pytest.raises(FakeTensorDeviceMismatchError):
            cuda + torch.ones(3)  # made with the default device, the CPU, as code without device= would


def test_the_audit_catches_the_old_posterior_noise(monkeypatch):
    """Before: train._noise drew on the CPU and AutoencoderStep only changed its dtype (``noise.to(mean.dtype)``)."""
    with fake_cuda(monkeypatch):
        with on_gpu():
            vae = ka.create(MICRO)
            mean, logvar = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean, torch.zeros(1, 4, 8, 8)
        noise = torch.randn(1, 4, 8, 8, device="cpu")  # what the old _noise returned
        with pytest.raises(FakeTensorDeviceMismatchError):
            mean + torch.exp(0.5 * logvar) * noise.to(mean.dtype)
        assert _on_cuda(mean + torch.exp(0.5 * logvar) * posterior_noise((1, 4, 8, 8), 0, 0, 0, 0, "cuda"))


def test_training_forward_on_cuda(monkeypatch):
    """AutoencoderStep with posterior sampling, LPIPS, the discriminator and the adaptive weight's inputs."""
    with fake_cuda(monkeypatch):
        with on_gpu():
            cfg = LossConfig(perceptual="lpips-vgg", lpips_weights="random", disc_start=0, disc_norm="group")
            objective = _buffers_to_cuda(AutoencoderObjective(cfg))
            vae = ka.create(MICRO).train()
            x = torch.rand(2, 3, 64, 64) * 2 - 1
        noise = posterior_noise((2, 4, 8, 8), seed=0, step=3, rank=0, micro=0, device="cuda")
        xrec, mean, logvar = AutoencoderStep(vae)(x, noise)
        out = objective.generator_loss(x, xrec, mean, logvar, step=1, last_layer=None)  # no autograd.grad here
        d = objective.discriminator_loss(x, xrec.detach(), step=1)
        last = vae.decoder.conv_out.weight  # the adaptive weight differentiates nll and g at this layer
        assert _on_cuda(xrec, mean, logvar, out.loss, out.nll, out.g, out.kl, d, last)


@pytest.mark.parametrize("tiling", ["never", "always", "approx", "auto"])
def test_encode_decode_every_tiling_mode_on_cuda(monkeypatch, tiling):
    # "auto" with a tight budget: the plan is exact tiles (estimate_tiled_bytes fits, untiled does not)
    with fake_cuda(monkeypatch):
        with on_gpu():
            vae = ka.create(MICRO)
            x = torch.rand(2, 3, 64, 64) * 2 - 1
        if tiling == "auto":
            tight = memory_plan.estimate_tiled_bytes(vae, (2, 3, 64, 64), "encode")
            monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(tight / memory_plan.CUDA_MEMORY_FRACTION) + 1, 0))
            assert memory_plan.tiling_plan(vae, (2, 3, 64, 64), "encode") == "tiles"
        mean, logvar = ka.encode_moments(vae, x, tiling=tiling, tile_size=32)
        z = ka.encode(vae, x, sample=True, generator=0, tiling=tiling, tile_size=32)
        y = ka.decode(vae, z, tiling=tiling, tile_size=32)
        r = ka.reconstruct(vae, x, tiling=tiling, tile_size=32)
        assert _on_cuda(mean, logvar, z, y, r) and y.shape == (2, 3, 64, 64)


def test_memory_plan_follows_the_cuda_budget(monkeypatch):
    with fake_cuda(monkeypatch):
        with on_gpu():
            vae = ka.create(MICRO)
        shape = (4, 3, 512, 512)
        need = memory_plan.estimate_untiled_bytes(vae, shape, "encode")
        plans = {}
        for name, free in {"plenty": 4 * need, "one image": need // 2, "tiles": memory_plan.estimate_tiled_bytes(vae, shape, "encode") * 2,
                           "nothing": 1}.items():
            monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 0))
            plans[name] = memory_plan.tiling_plan(vae, shape, "encode")
            assert memory_plan.memory_budget(vae) == int(memory_plan.CUDA_MEMORY_FRACTION * free)
    assert plans == {"plenty": "whole", "one image": "slices", "tiles": "tiles", "nothing": "approx"}
    # blocks torch's caching allocator keeps but does not use are free for us, though mem_get_info says taken
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 10_000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 4_000)
    assert memory_plan.available_memory("cuda") == 1 + 6_000


def test_dtypes_and_force_upcast():
    """fp16 with force_upcast decodes and encodes in fp32 (diffusers' needs_upcasting); bf16 runs as is.

    On real CPU tensors: a fake model cannot change dtype in place (``Module.to`` cannot swap fake
    parameters), and the rule does not depend on the device.
    """
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    for dtype, upcast in ((torch.float16, True), (torch.float16, False), (torch.bfloat16, True)):
        vae = ka.create(MICRO).to(dtype)
        vae.register_to_config(force_upcast=upcast)
        seen = []
        hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype)) for m in (vae.encoder.conv_in, vae.decoder.conv_in)]
        ka.decode(vae, ka.encode(vae, x))
        for h in hooks:
            h.remove()
        expect = torch.float32 if (dtype == torch.float16 and upcast) else dtype
        assert seen == [expect, expect], (dtype, upcast, seen)
        assert next(vae.parameters()).dtype == dtype  # the model is put back


def test_score_and_interpolate_on_cuda(monkeypatch):
    with fake_cuda(monkeypatch):
        with on_gpu():
            vae = ka.create(MICRO)
            x = torch.rand(2, 3, 64, 64) * 2 - 1
        e = ka.elbo_bits_per_dim(vae, x, samples=1)
        e0 = ka.elbo_bits_per_dim(vae, x, samples=0)
        strip = ka.interpolate(vae, x[:1], x[1:], 3)
        assert _on_cuda(strip) and strip.shape == (3, 3, 64, 64)
        assert e["bpd"].shape == (2,) and e0["rec_bpd"].shape == (2,)  # returned on the CPU for reporting


def test_latent_dataset_sampling_and_transfer_to_cuda(monkeypatch, tmp_path: Path):
    """Items are made where their moments are (the CPU in DataLoader workers: safetensors files are read
    there, which FakeTensorMode cannot do); a batch goes to the GPU pinned and non_blocking. The sampling
    itself is audited on moments that live on the (fake) GPU."""
    from kl_autoencoder.latents import LatentDataset
    from kl_autoencoder.utils.devices import to_device

    data = tmp_path / "data"
    data.mkdir()
    for i, im in enumerate(sample_photos(64)[:2]):
        im.save(data / f"{i}.png")
    ka.encode_dataset(ka.create(MICRO), data, tmp_path / "cache", resolution=64, num_workers=0, progress=False)
    ds = LatentDataset(tmp_path / "cache", sample=True, seed=1)
    batch = LatentDataset.collate([ds[0], ds[1]])  # (2, 4, 8, 8) on the CPU
    with fake_cuda(monkeypatch):
        moved = to_device(batch, "cuda")
        with on_gpu():
            vae = ka.create(MICRO)
            gpu_moments = (torch.zeros(4, 8, 8), torch.zeros(4, 8, 8))
        assert _on_cuda(moved["latents"], ka.decode(vae, moved["latents"]))
        monkeypatch.setattr(ds, "moments", lambda i, flip=False: gpu_moments)  # moments that live on the GPU
        assert _on_cuda(ds[0]["latents"])
