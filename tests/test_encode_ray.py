"""`encode --engine ray` on a local Ray cluster (2 CPUs, 2 encoder actors, tiny model): the same samples and latents
as the default engine, resume, and an encoder actor killed mid-job with `ray.kill` losing or doubling nothing.

Slow: a local Ray cluster plus actor processes that import torch take 30-60 s per job on a 2-core machine."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

import kl_autoencoder as ka
from kl_autoencoder.errors import InputError
from kl_autoencoder.latents import LatentDataset, RayOptions, encode_dataset, read_manifest
from kl_autoencoder.latents.ray_engine import RayEncoder, plan

from dataset_utils import img2dataset_tar, photo, read_with_webdataset

ray = pytest.importorskip("ray")
REGISTRY = "kl-autoencoder-test-registry"
OPTIONS = dict(actors=2, cpus_per_actor=0.75)  # 2 x 0.75 CPU for the actors, 0.5 CPU left for read tasks


def test_plan_leaves_cpus_for_reading():
    assert plan(RayOptions(), {"CPU": 2.0}) == {"actors": 1, "cpus_per_actor": 1.5, "gpus_per_actor": 0.0, "read_cpus": 0.5}
    assert plan(RayOptions(), {"CPU": 64.0, "GPU": 8.0}) == {"actors": 8, "cpus_per_actor": 1.0, "gpus_per_actor": 1.0,
                                                              "read_cpus": 1.0}
    assert plan(RayOptions(**OPTIONS), {"CPU": 2.0})["read_cpus"] == 0.5
    with pytest.raises(InputError, match="leave none for reading"):  # Ray Data would wait forever for a read slot
        plan(RayOptions(actors=2, cpus_per_actor=1.0), {"CPU": 2.0})


@pytest.fixture(scope="module")
def ray_cluster():
    # the actors import kl_autoencoder and this module (RegisteringEncoder): the raylet passes its env on
    old = os.environ.get("PYTHONPATH")
    paths = [str(Path(__file__).parent), str(Path(ka.__file__).parent.parent)] + ([old] if old else [])
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    ray.init(num_cpus=2, object_store_memory=150 * 2**20, include_dashboard=False)
    yield
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = old


@ray.remote(num_cpus=0)
class Registry:
    def __init__(self) -> None:
        self.handles: list = []

    def add(self, handle) -> None:
        self.handles.append(handle)

    def get(self) -> list:
        return self.handles


class RegisteringEncoder(RayEncoder):
    """Our encoder actor, registering its own handle so the test can `ray.kill` it; each batch takes >= 0.2 s."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        ray.get(ray.get_actor(REGISTRY).add.remote(ray.get_runtime_context().current_actor))

    def __call__(self, batch):
        time.sleep(0.2)
        return super().__call__(batch)


class TightMemoryEncoder(RayEncoder):
    """Our encoder actor on a device that holds one image at a time: each batch of two runs out of memory once,
    and the actor tallies those in the registry actor (an independent count of what the manifest should say)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from kl_autoencoder.latents import encoding

        real, registry = encoding.encode_moments, ray.get_actor(REGISTRY)

        def tight(vae, x, **kw):
            if x.shape[0] > 1:
                ray.get(registry.add.remote(int(x.shape[0])))
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real(vae, x, **kw)

        encoding.encode_moments = tight  # this actor's process only


def _tars(root: Path, shards: int = 3, per: int = 6) -> str:
    for s in range(shards):
        img2dataset_tar(root / f"{s:05d}.tar", s, per, corrupt={4} if s == 1 else set(), no_caption={0} if s == 0 else set())
    return str(root / f"{{00000..{shards - 1:05d}}}.tar")


def _same_cache(a: Path, b: Path, variants: list[tuple[int | None, bool]]) -> None:
    """Same samples, skipped inputs, captions and (<= 1e-5) moments of every variant."""
    ma, mb = read_manifest(a), read_manifest(b)
    assert [s["path"] for s in mb["samples"]] == [s["path"] for s in ma["samples"]]
    assert [s["path"] for s in mb["skipped"]] == [s["path"] for s in ma["skipped"]]
    for res, flip in variants:
        da, db = LatentDataset(a, resolution=res), LatentDataset(b, resolution=res)
        for i in range(len(da)):
            for x, y in zip(da.moments(i, flip), db.moments(i, flip)):
                torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
            assert db.text(i) == da.text(i)


@pytest.mark.slow
def test_ray_engine_matches_default_engine_and_resumes(ray_cluster, micro_vae, tmp_path):
    spec = _tars(tmp_path / "tars")
    kw = dict(resolution="32,64", flip="both", batch_size=2, shard_size=4, progress=False)
    encode_dataset(micro_vae, spec, tmp_path / "default", num_workers=0, **kw)
    r = encode_dataset(micro_vae, spec, tmp_path / "ray", engine="ray", ray=RayOptions(**OPTIONS), **kw)
    assert (r.n_samples, r.n_encoded, r.n_skipped, r.n_no_caption) == (17, 17, 1, 1)
    _same_cache(tmp_path / "default", tmp_path / "ray", [(32, False), (32, True), (64, False), (64, True)])
    expected = read_with_webdataset(spec)  # captions against webdataset's own reader
    ds = LatentDataset(tmp_path / "ray")
    assert all(ds[i]["caption"] == expected[ds[i]["path"]]["caption"] for i in range(len(ds)))

    # resumable the same way: a rerun encodes nothing; a changed tar only its samples
    r = encode_dataset(micro_vae, spec, tmp_path / "ray", engine="ray", ray=RayOptions(**OPTIONS), **kw)
    assert (r.n_encoded, r.n_unchanged) == (0, 17)
    img2dataset_tar(tmp_path / "tars" / "00002.tar", 2, 6, seed=5)
    r = encode_dataset(micro_vae, spec, tmp_path / "ray", engine="ray", ray=RayOptions(**OPTIONS), **kw)
    assert (r.n_encoded, r.n_unchanged) == (6, 11)
    encode_dataset(micro_vae, spec, tmp_path / "default", num_workers=0, **kw)
    _same_cache(tmp_path / "default", tmp_path / "ray", [(32, False), (64, True)])

    # a folder with metadata.jsonl: files go to read tasks in chunks
    data = tmp_path / "folder"
    data.mkdir()
    for i in range(5):
        photo(40 + i, (72, 64)).save(data / f"{i}.png")
    (data / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": f"t{i}"}) + "\n" for i in range(4)))
    kw = dict(resolution=32, batch_size=2, progress=False)
    encode_dataset(micro_vae, data, tmp_path / "fd", num_workers=0, **kw)
    encode_dataset(micro_vae, data, tmp_path / "fr", engine="ray", ray=RayOptions(**OPTIONS), **kw)
    _same_cache(tmp_path / "fd", tmp_path / "fr", [(None, False)])
    assert [LatentDataset(tmp_path / "fr")[i]["caption"] for i in range(5)] == ["t0", "t1", "t2", "t3", ""]


@pytest.mark.slow
@pytest.mark.parametrize("no_restart", [True, False], ids=["killed-for-good", "killed-and-restarted"])
def test_ray_actor_killed_mid_job_every_sample_once(ray_cluster, micro_vae, tmp_path, no_restart):
    spec = _tars(tmp_path / "tars", shards=4, per=8)
    kw = dict(resolution=32, batch_size=2, shard_size=2, progress=False)
    encode_dataset(micro_vae, spec, tmp_path / "default", num_workers=0, **kw)
    out = tmp_path / "ray"
    registry = Registry.options(name=REGISTRY).remote()
    killed: list[int] = []

    def killer() -> None:  # once the driver has written a shard, kill one encoder actor (ray.kill, as an operator would)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            handles = ray.get(registry.get.remote())
            if handles and list(out.glob("shard-*.safetensors")):
                ray.kill(handles[0], no_restart=no_restart)
                killed.append(len(list(out.glob("shard-*.safetensors"))))
            time.sleep(0.01)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        r = encode_dataset(micro_vae, spec, out, engine="ray", ray=RayOptions(**OPTIONS, encoder_cls=RegisteringEncoder), **kw)
    finally:
        thread.join(timeout=5)
        ray.kill(registry)
    m = read_manifest(out)
    assert killed and killed[0] < len(m["shards"]), f"the kill did not land mid-job: {killed}, {len(m['shards'])} shards"
    valid = sorted(p for p in read_with_webdataset(spec) if p != "00001.tar/000010004")
    assert [s["path"] for s in m["samples"]] == valid and r.n_encoded == len(valid)  # every sample exactly once
    assert m["counts"]["duplicates"] == 0  # not even delivered twice: nothing left for the Collector's guard to drop
    from safetensors import safe_open

    stored = []
    for name in m["shards"]:
        with safe_open(str(out / name), framework="pt") as f:
            stored += [s["path"] for s in json.loads(f.metadata()["samples"])]
    assert sorted(stored) == valid  # and stored once
    _same_cache(tmp_path / "default", out, [(None, False)])


@pytest.mark.slow
def test_ray_engine_counts_oom_halvings_in_the_manifest(ray_cluster, micro_vae, tmp_path):
    """An encoder actor out of memory halves its batch (nothing lost) and the manifest counts every halving, as the
    default engine's does."""
    data = tmp_path / "folder"
    data.mkdir()
    for i in range(6):
        photo(50 + i, (64, 64)).save(data / f"{i}.png")
    kw = dict(resolution=32, batch_size=2, progress=False)
    encode_dataset(micro_vae, data, tmp_path / "default", num_workers=0, **kw)
    registry = Registry.options(name=REGISTRY).remote()
    try:
        r = encode_dataset(micro_vae, data, tmp_path / "ray", engine="ray",
                           ray=RayOptions(**OPTIONS, encoder_cls=TightMemoryEncoder), **kw)
        raised = ray.get(registry.get.remote())  # one entry per out-of-memory, from the actors themselves
    finally:
        ray.kill(registry)
    assert r.n_encoded == 6 and raised and set(raised) == {2}
    assert read_manifest(tmp_path / "ray")["counts"]["oom_halvings"] == len(raised)
    _same_cache(tmp_path / "default", tmp_path / "ray", [(None, False)])
