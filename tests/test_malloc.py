"""malloc.reuse_freed_memory: freed large blocks are reused (no fresh page faults) inside the block only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import kl_autoencoder as ka
from kl_autoencoder import settings
from kl_autoencoder.inference import malloc, memory_plan

glibc_only = pytest.mark.skipif(not malloc.supported(), reason="tunes glibc malloc only (Linux)")

# Runs in a fresh process: the heap layout left by earlier tests would decide where a block lands.
SCRIPT = """
import json, resource, torch
from kl_autoencoder.inference import malloc
MIB = 2**20

def faults(nbytes):
    # fewest minor page faults of one allocate-write-free of nbytes, over cycles 3-6: the steady state
    # (the first cycles may land on fresh heap pages, or two blocks may alternate)
    counts = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = torch.empty(nbytes // 4); a.fill_(1.0); del a
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(counts[2:])

r = {"before": faults(64 * MIB)}
with malloc.reuse_freed_memory():
    r["inside"] = faults(64 * MIB)
    with malloc.reuse_freed_memory():
        pass
    r["after_inner_exit"] = faults(64 * MIB)
    r["active_after_inner_exit"] = malloc.active()
r["active_after"] = malloc.active()
r["after_big"] = faults(256 * MIB)  # larger than any block the heap kept: mmapped and unmapped again
print(json.dumps(r))
"""
PAGES_64 = 64 * 2**20 // 4096


def run_script(**env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_freed_memory_is_reused_inside_the_block_only():
    r = run_script()
    # glibc mmaps blocks above 32 MiB and unmaps them on free: every page faults again ...
    assert r["before"] > PAGES_64 // 2
    # ... inside the block the freed heap memory is handed out again, already mapped
    assert r["inside"] < PAGES_64 // 20
    assert r["active_after_inner_exit"] and r["after_inner_exit"] < PAGES_64 // 20  # nesting keeps it on
    assert not r["active_after"]
    assert r["after_big"] > 4 * PAGES_64 // 2  # the defaults are back: mmapped again


@glibc_only
def test_environment_switch_turns_it_off():
    r = run_script(**{settings.MALLOC_ENV: "0"})
    assert r["inside"] > PAGES_64 // 2


def test_enabled_false_is_a_no_op():
    with malloc.reuse_freed_memory(enabled=False):
        assert not malloc.active()


def test_exception_inside_restores():
    with pytest.raises(RuntimeError):
        with malloc.reuse_freed_memory():
            raise RuntimeError("boom")
    assert not malloc.active()


@glibc_only
def test_api_runs_untiled_cpu_calls_inside_the_block_and_tiled_ones_outside():
    vae = ka.create("tiny-kl-f8")
    seen = []
    for name, conv in (("enc", vae.encoder.conv_in), ("dec", vae.decoder.conv_in)):  # the tiled path calls these too
        conv.register_forward_hook(lambda *a, name=name: seen.append((name, malloc.active())))
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    latents = ka.encode(vae, x, tiling="never")
    ka.decode(vae, latents, tiling="never")
    assert seen == [("enc", True), ("dec", True)]
    assert not malloc.active()

    seen.clear()
    latents = ka.encode(vae, x, tiling="always", tile_size=32)
    ka.decode(vae, latents, tiling="always", tile_size=32)
    assert {s[0] for s in seen} == {"enc", "dec"} and not any(s[1] for s in seen)


def test_reuse_needs_memory_to_spare(monkeypatch):
    vae = ka.create("tiny-kl-f8")
    shape = (1, 3, 256, 256)
    need = memory_plan.estimate_untiled_bytes(vae, shape, "encode")
    plenty = int(2 * memory_plan.REUSE_MEMORY_FACTOR * need / memory_plan.AUTO_MEMORY_FRACTION)
    monkeypatch.setattr(memory_plan, "available_memory", lambda device="cpu": plenty)
    assert memory_plan.reuse_fits(vae, shape, "encode", "whole")
    assert not memory_plan.reuse_fits(vae, shape, "encode", "tiles")
    assert not memory_plan.reuse_fits(vae, shape, "encode", "approx")
    # a batch run image by image needs room for one image only
    assert memory_plan.reuse_fits(vae, (64, 3, 256, 256), "encode", "slices")
    assert not memory_plan.reuse_fits(vae, (64, 3, 256, 256), "encode", "whole")
    monkeypatch.setattr(memory_plan, "available_memory", lambda device="cpu": int(need / memory_plan.AUTO_MEMORY_FRACTION))  # fits once, not twice
    assert not memory_plan.reuse_fits(vae, shape, "encode", "whole")


KEEP_SCRIPT = SCRIPT.split("r = {")[0] + """
def first_faults(nbytes):  # the next call's first allocation: mapped already, or faulted in again
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.empty(nbytes // 4); a.fill_(1.0); del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

r = {}
with malloc.reuse_freed_memory():
    faults(64 * MIB)  # a call's activations
r["kept"] = malloc.kept()
r["kept_bytes"] = malloc.kept_bytes()  # the planner adds these to the host's free RAM
r["between_calls"] = first_faults(64 * MIB)
malloc.release()
r["kept_after_release"] = malloc.kept()
with malloc.reuse_freed_memory():
    faults(64 * MIB)
malloc.release()
r["after_release"] = first_faults(64 * MIB)
print(json.dumps(r))
"""


@glibc_only
@pytest.mark.parametrize("mode", ["keep", "call"])
def test_freed_memory_stays_between_calls_until_empty_cache(mode):
    """Issue 20: the next call finds its memory already mapped (default); empty_cache() / MALLOC=call hand it back."""
    env = {**os.environ, settings.MALLOC_ENV: "1" if mode == "keep" else "call"}
    out = subprocess.run([sys.executable, "-c", KEEP_SCRIPT], capture_output=True, text=True, check=True, env=env)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if mode == "keep":
        assert r["kept"] and r["between_calls"] < PAGES_64 // 20
        assert r["kept_bytes"] >= 64 * 2**20
    else:
        assert not r["kept"] and r["between_calls"] > PAGES_64 // 2 and r["kept_bytes"] == 0
    assert not r["kept_after_release"] and r["after_release"] > PAGES_64 // 2
    assert ka.empty_cache is malloc.release
