"""The encode job: images -> sharded safetensors of posterior moments + ``manifest.json``; resumable.

The format is ``format.py``'s. Shards are written to a temp file, fsynced, then renamed, so a shard on
disk is always whole; they are the record of finished work: a rerun reads their headers, hashes every
input, and encodes only files with no entry of the same sha256 (new or changed bytes). A kill at any
moment loses at most the shard being filled. Under ``accelerate launch`` process r takes files r, r+W,
r+2W, ... (sorted list, W processes) and writes its own shards; the main process merges the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..errors import InputError
from ..inference import encode_moments
from ..model import downsample_factor, latent_normalization, resolve_dtype
from ..utils.files import atomic_path, save_json
from ..utils.images import IMAGE_EXTENSIONS, ImageError, find_images, load_image
from .buckets import Transform
from .format import FORMAT, SHARD_RE, CacheMismatchError, cache_identity, scan_shards

log = logging.getLogger("kl_autoencoder")


# ----------------------------------------------------------------------------- loading (DataLoader workers)


class _Source(Dataset):
    """Input ``i``: hashes the file's bytes; if unchanged returns no pixels, else decodes and transforms."""

    def __init__(self, root: Path, rels: list[str], known: dict[str, set[str]], transform: Transform) -> None:
        self.root, self.rels, self.known, self.transform = root, rels, known, transform

    def __len__(self) -> int:
        return len(self.rels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rel = self.rels[i]
        path = self.root / rel if rel else self.root
        try:
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as e:
            return {"path": rel, "status": "skipped", "reason": f"{path}: unreadable ({e.strerror or e})"}
        if sha in self.known.get(rel, ()):
            return {"path": rel, "status": "unchanged", "sha256": sha}
        try:
            img = load_image(path)
        except ImageError as e:
            return {"path": rel, "status": "skipped", "reason": str(e)}
        out, box, bucket = self.transform(img)
        pixels = torch.from_numpy(np.asarray(out).copy())  # (h, w, 3) uint8: 4x less IPC than float
        return {"path": rel, "status": "new", "sha256": sha, "size": [img.width, img.height],
                "crop_box": list(box), "flip": False, "bucket": list(bucket), "pixels": pixels}


def _identity_collate(x: Any) -> Any:
    return x


# ----------------------------------------------------------------------------- writing (background thread)


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:  # fsynced before the name says the shard exists; mode as the umask says
        save_file(tensors, str(tmp), metadata=metadata)


class _ShardWriter:
    """Buffers samples and writes full shards in one background thread (overlaps the encoder)."""

    def __init__(self, out: Path, rank: int, seq: int, shard_size: int, identity: dict[str, Any]) -> None:
        self.out, self.rank, self.seq, self.shard_size = out, rank, seq, shard_size
        self.identity = json.dumps(identity, sort_keys=True)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self.pending: Future | None = None
        self.tensors: dict[str, torch.Tensor] = {}
        self.samples: list[dict[str, Any]] = []
        self.written: list[dict[str, Any]] = []  # entries whose shard is on disk

    def add(self, meta: dict[str, Any], mean: torch.Tensor, logvar: torch.Tensor) -> None:
        key = str(len(self.samples))
        self.tensors[f"{key}.mean"], self.tensors[f"{key}.logvar"] = mean, logvar
        self.samples.append(dict(meta, key=key, shape=list(mean.shape)))
        if len(self.samples) >= self.shard_size:
            self.flush()

    def _wait(self) -> None:
        if self.pending is not None:
            self.written.extend(self.pending.result())  # re-raises a failed write here
            self.pending = None

    def flush(self) -> None:
        if not self.samples:
            return
        self._wait()  # at most one shard in flight: memory stays bounded if the disk is slow
        name = f"shard-r{self.rank:03d}-{self.seq:06d}.safetensors"
        self.seq += 1
        tensors, samples = self.tensors, [dict(s, shard=name) for s in self.samples]
        md = {"format": FORMAT, "identity": self.identity, "samples": json.dumps(self.samples)}
        self.pending = self.pool.submit(lambda: (_write_shard(self.out / name, tensors, md), samples)[1])
        self.tensors, self.samples = {}, []

    def close(self) -> list[dict[str, Any]]:
        try:
            self.flush()
            self._wait()
        finally:
            self.pool.shutdown(wait=True)
        return self.written


# ----------------------------------------------------------------------------- the job


@dataclass
class EncodeResult:
    out: Path
    n_inputs: int
    n_samples: int
    n_encoded: int
    n_unchanged: int
    n_skipped: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.n_encoded / self.seconds if self.seconds > 0 else float("nan")


def _prepare_out(out: Path, identity: dict[str, Any], overwrite: bool) -> None:
    """Main process, before the others start: refuse (or clear) a cache made differently."""
    out.mkdir(parents=True, exist_ok=True)
    for p in out.glob(".shard-*.tmp"):
        p.unlink()  # a write that a kill interrupted; its samples were never reported as done
    manifest = out / "manifest.json"
    ours = [p for p in out.iterdir() if SHARD_RE.match(p.name) or p.name == "manifest.json" or p.name.startswith("part-r")]
    if overwrite:
        for p in ours:
            p.unlink()
    old = json.loads(manifest.read_text()) if manifest.is_file() else None
    others = {json.dumps(i, sort_keys=True) for _, i, _ in scan_shards(out)}
    if old is not None:
        others.add(json.dumps(old.get("identity"), sort_keys=True))
    mine = json.dumps(identity, sort_keys=True)
    if others - {mine}:
        theirs = json.loads(sorted(others - {mine})[0]) or {}
        diff = [k for k in identity if theirs.get(k) != identity[k]] or ["format"]
        raise CacheMismatchError(
            f"{out}: holds latents made with a different {', '.join(diff)}; "
            "choose another OUT, or pass --overwrite to delete them and start again"
        )
    if old is None:
        save_json({"format": FORMAT, "complete": False, "identity": identity}, manifest)


@dataclass
class _Job:
    """One process's share of an encode job and everything the loop needs."""

    vae: torch.nn.Module
    data: Path
    out: Path
    transform: Transform
    identity: dict[str, Any]
    store: torch.dtype  # dtype the moments are stored in
    device: torch.device
    rank: int
    world: int
    rels: list[str]  # every input (relative path), all ranks
    encode_kw: dict[str, Any] = field(default_factory=dict)

    @property
    def mine(self) -> list[str]:
        return self.rels[self.rank :: self.world]


def _finished_work(out: Path, rank: int) -> tuple[dict[str, dict[str, dict[str, Any]]], int]:
    """Entries already in shards (path -> sha256 -> entry; later shards win) and this rank's next shard number."""
    known: dict[str, dict[str, dict[str, Any]]] = {}
    seq = 0
    for p, _, samples in scan_shards(out):
        for s in samples:
            known.setdefault(s["path"], {})[s["sha256"]] = dict(s, shard=p.name)
        m = SHARD_RE.match(p.name)
        if int(m.group(1)) == rank:
            seq = max(seq, int(m.group(2)) + 1)
    return known, seq


def _encode_batch(job: _Job, writer: _ShardWriter, items: list[dict[str, Any]]) -> None:
    x = torch.stack([it.pop("pixels") for it in items]).to(job.device)  # (B, h, w, 3) uint8
    x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # (B, 3, h, w) in [-1, 1], as images.uint8_to_tensor
    mean, logvar = encode_moments(job.vae, x, pad=None, **job.encode_kw)  # (B, C, h/8, w/8)
    mean, logvar = mean.to("cpu", job.store).contiguous(), logvar.to("cpu", job.store).contiguous()  # chunk() gave views
    for i, it in enumerate(items):
        meta = {k: it[k] for k in ("path", "sha256", "size", "crop_box", "flip", "bucket")}
        writer.add(meta, mean[i].clone(), logvar[i].clone())  # clone: safetensors refuses shared storage


def _run(job: _Job, loader: DataLoader, writer: _ShardWriter, known: dict, batch_size: int, progress: bool
         ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The loop: unchanged inputs are kept, unreadable ones listed, new ones encoded in same-bucket batches."""
    kept, skipped, pending = [], [], {}
    bar = tqdm(total=len(job.mine), unit="img", desc=f"encode r{job.rank}" if job.world > 1 else "encode",
               disable=not progress or job.rank != 0, dynamic_ncols=True)
    try:
        for item in loader:
            if item["status"] == "unchanged":
                kept.append(known[item["path"]][item["sha256"]])
            elif item["status"] == "skipped":
                log.warning("skipped %s", item["reason"])
                skipped.append({"path": item["path"], "reason": item["reason"]})
            else:
                group = pending.setdefault(tuple(item["bucket"]), [])
                group.append(item)
                if len(group) >= batch_size:
                    _encode_batch(job, writer, pending.pop(tuple(item["bucket"])))
            bar.update(1)
        for group in pending.values():
            _encode_batch(job, writer, group)
    finally:
        bar.close()
    return kept, skipped


def encode_dataset(
    vae: torch.nn.Module,
    data: str | Path,
    out: str | Path,
    *,
    resolution: int | None = 256,
    buckets: int | None = None,
    shard_size: int = 256,
    dtype: str = "fp32",
    batch_size: int = 8,
    num_workers: int = 2,
    overwrite: bool = False,
    tiling: str = "auto",
    tile_size: int | None = None,
    model_name: str | None = None,
    progress: bool = True,
) -> EncodeResult:
    """Encode every image under ``data`` into a latent cache in ``out`` (see module doc); resumable.

    ``resolution``: centre crop to N x N; or ``buckets``: aspect-ratio buckets of about this many pixels.
    ``dtype``: stored moments fp32 / fp16 / bf16 (the encoder runs in the model's own dtype).
    Works in a plain process and under ``accelerate launch`` (accelerate.PartialState).
    """
    from accelerate import PartialState

    if shard_size < 1 or batch_size < 1:
        raise InputError("--shard-size and --batch-size must be >= 1")
    store = resolve_dtype(dtype)
    transform = Transform.bucketed(buckets) if buckets else Transform.fixed(int(resolution or 256))
    data, out = Path(data), Path(out)
    # cpu=True on a machine without CUDA: accelerate then forms a gloo group from torchrun/mpirun's env
    # (WORLD_SIZE, LOCAL_RANK) instead of silently running every process as rank 0 of 1
    state = PartialState(cpu=not torch.cuda.is_available())
    if next(vae.parameters()).device != state.device:
        vae = vae.to(state.device)
    t0 = time.perf_counter()
    files = find_images(data)
    if not files:
        raise FileNotFoundError(f"{data}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    rels = [p.relative_to(data).as_posix() if data.is_dir() else "" for p in files]
    job = _Job(vae, data, out, transform, cache_identity(vae, transform, dtype), store, state.device,
               state.process_index, state.num_processes, rels, {"tiling": tiling, "tile_size": tile_size})
    if state.is_main_process:
        _prepare_out(out, job.identity, overwrite)
    state.wait_for_everyone()

    known, seq = _finished_work(out, job.rank)
    source = _Source(data, job.mine, {r: set(known.get(r, {})) for r in job.mine}, transform)
    loader = DataLoader(source, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_identity_collate,
                        prefetch_factor=max(2, batch_size) if num_workers else None)
    writer = _ShardWriter(out, job.rank, seq, shard_size, job.identity)
    try:
        kept, skipped = _run(job, loader, writer, known, batch_size, progress)
    finally:
        written = writer.close()  # a kill lands anywhere; an exception still saves the finished samples
    seconds = time.perf_counter() - t0
    part = {"rank": job.rank, "world_size": job.world, "inputs": len(job.mine), "entries": kept + written,
            "skipped": skipped, "encoded": len(written), "unchanged": len(kept)}
    save_json(part, out / f"part-r{job.rank:03d}.json")
    state.wait_for_everyone()
    if state.is_main_process:
        c = _merge(vae, out, job.world, job.identity, transform, dtype, len(rels), model_name)["counts"]
        log.info("encode: %d samples (%d encoded, %d unchanged, %d skipped) in %.1f s -> %s",
                 c["samples"], c["encoded"], c["unchanged"], c["skipped"], seconds, out / "manifest.json")
    state.wait_for_everyone()
    c = json.loads((out / "manifest.json").read_text())["counts"]
    return EncodeResult(out, c["inputs"], c["samples"], c["encoded"], c["unchanged"], c["skipped"], seconds)


def _merge(vae, out: Path, world: int, identity: dict, transform: Transform, dtype: str, n_inputs: int,
           model_name: str | None) -> dict[str, Any]:
    """Main process: parts of all ranks -> manifest.json; shards no entry points to are then deleted."""
    parts = [json.loads((out / f"part-r{r:03d}.json").read_text()) for r in range(world)]
    samples = sorted((e for p in parts for e in p["entries"]), key=lambda e: e["path"])
    live = {e["shard"] for e in samples}
    shards = [p for p, _, _ in scan_shards(out)]
    norm = latent_normalization(vae)  # model/normalization.py: the rule LatentDataset applies
    manifest = {
        "format": FORMAT,
        "complete": True,
        "identity": identity,
        "model": model_name,
        "scaling_factor": norm.scaling_factor,
        "shift_factor": norm.shift_factor,
        "latent_normalization": norm.to_json(),
        "latent_channels": int(vae.config.latent_channels),
        "downsample_factor": downsample_factor(vae),
        "dtype": dtype,
        "transform": transform.to_json(),
        "resolution": transform.buckets[0][0] if transform.kind == "center-crop" else None,
        "buckets": [list(b) for b in transform.buckets],
        "counts": {"inputs": n_inputs, "samples": len(samples), "encoded": sum(p["encoded"] for p in parts),
                   "unchanged": sum(p["unchanged"] for p in parts), "skipped": sum(len(p["skipped"]) for p in parts),
                   "world_size": world},
        "skipped": sorted((s for p in parts for s in p["skipped"]), key=lambda s: s["path"]),
        "shards": sorted(live),
        "samples": samples,
    }
    save_json(manifest, out / "manifest.json")
    for p in shards:  # superseded entries only (changed or deleted images): the manifest no longer names them
        if p.name not in live:
            p.unlink()
    for p in out.glob("part-r*.json"):
        p.unlink()
    return manifest
