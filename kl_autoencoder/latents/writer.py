"""The encode job: images -> sharded safetensors of posterior moments + ``manifest.json``; resumable.

Inputs are ``sources.py``'s (an image folder, webdataset tars); what is stored per sample is
``variants.py``'s (resolutions, mirror image); the per-sample work is ``encoding.py``'s; shards and the
bookkeeping of finished work are ``shards.py``'s; the format is ``format.py``'s. A rerun encodes only
inputs whose path and image sha256 no shard holds yet, so a kill at any moment loses at most the shard
being filled. Engines: ``default`` runs here (a DataLoader reads and crops, this process encodes), and
under ``accelerate launch`` process r takes units r, r+W, ... (files, or whole tars) and writes its own
shards; the main process merges the manifest. ``ray`` runs the same steps as a Ray Data pipeline
(``ray_engine.py``). Each step is one function (``prepare_out``, ``Known``, ``_run_local`` /
``run_ray``, ``encode_pixels``, ``_merge``), so a lock around the job or a retry around an encoder
call wraps one call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from ..errors import InputError
from ..model import downsample_factor, latent_normalization, resolve_dtype
from ..utils.files import save_json
from ..utils.locks import output_lock
from .encoding import Digests, Job, encode_records, group_key, log_split, prepare
from .format import FORMAT, SHARD_RE, CacheMismatchError, cache_identity
from .ray_engine import RayOptions
from .shards import Collector, Known, ShardWriter, prepare_out
from .sources import Source, open_source
from .variants import Variants

__all__ = ["CacheMismatchError", "EncodeResult", "encode_dataset"]
ENGINES = ("default", "ray")
log = logging.getLogger("kl_autoencoder")


@dataclass
class EncodeResult:
    out: Path
    n_inputs: int
    n_samples: int
    n_encoded: int
    n_unchanged: int
    n_skipped: int
    seconds: float
    n_recaptioned: int = 0
    n_no_caption: int = 0

    @property
    def images_per_s(self) -> float:
        return self.n_encoded / self.seconds if self.seconds > 0 else float("nan")


# ----------------------------------------------------------------------------- the default engine


class _Records(IterableDataset):
    """Records of ``units``; DataLoader worker w of n reads units w, w + n, ... (whole tars)."""

    def __init__(self, source: Source, units: list[str], known: Digests, variants: Variants) -> None:
        self.source, self.units, self.known, self.variants = source, units, known, variants

    def __iter__(self):
        info = get_worker_info()
        units = self.units if info is None else self.units[info.id :: info.num_workers]
        for unit in units:
            for raw in self.source.read(unit):
                yield prepare(raw, self.known, self.variants)


def _identity_collate(x: Any) -> Any:
    return x


def _encode_batch(job: Job, collector: Collector, records: list[dict[str, Any]]) -> None:
    """One batch of same-bucket records through the encoder (every variant) into the shards."""
    def halved(batch: int, half: int) -> None:
        log_split(batch, half)
        collector.counts["oom_halvings"] += 1  # reported in the manifest's counts
        job.batch_limit = min(job.batch_limit or batch, half)  # later batches start at a size that fits

    done = 0
    while done < len(records):
        chunk = records[done : done + (job.batch_limit or len(records))]
        moments = encode_records(job.vae, chunk, job.variants, job.store, job.device, job.encode_kw, on_split=halved)
        for record, m in zip(chunk, moments):
            collector.take(record, m)
        done += len(chunk)


def _run_local(job: Job, known: Known, collector: Collector, batch_size: int, num_workers: int) -> None:
    """Unchanged inputs are kept, unreadable ones listed, new ones encoded in same-bucket batches."""
    records = _Records(job.source, job.units, known.digests(), job.variants)
    loader = DataLoader(records, batch_size=None, num_workers=num_workers, collate_fn=_identity_collate,
                        prefetch_factor=max(2, batch_size) if num_workers else None)
    pending: dict[tuple, list[dict[str, Any]]] = {}
    for record in loader:
        if record["status"] != "new":
            collector.take(record)
            continue
        group = pending.setdefault(group_key(record), [])
        group.append(record)
        if len(group) >= batch_size:
            _encode_batch(job, collector, pending.pop(group_key(record)))
    for group in pending.values():
        _encode_batch(job, collector, group)


# ----------------------------------------------------------------------------- the job


def progress_bar(job: Job, enabled: bool) -> tqdm:
    """images/s, skipped and unchanged counts; a total only where it is known before reading (folders)."""
    total = len(job.units) if job.source.kind == "folder" else None
    return tqdm(total=total, unit="img", desc=f"encode r{job.rank}" if job.world > 1 else "encode",
                disable=not enabled or job.rank != 0, dynamic_ncols=True)


def encode_dataset(
    vae: torch.nn.Module,
    data: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    resolution: int | str | Sequence[int] | None = 256,
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
    flip: str | bool = "none",
    caption_key: str | None = None,
    engine: str = "default",
    ray: RayOptions | None = None,
) -> EncodeResult:
    """Encode every sample of ``data`` (``sources.py``: folder, image, webdataset tars) into a latent cache in
    ``out`` (see module doc); resumable.

    ``resolution``: centre crop to N x N, or several (``[256, 512]`` / ``"256,512"``: all stored, the first
    is the default of ``LatentDataset``); or ``buckets``: aspect-ratio buckets of about this many pixels.
    ``flip="both"``: also store the moments of the mirrored crop. ``caption_key``: the caption's column
    / sidecar suffix / tar member (default ``text`` / ``.txt`` or ``.caption`` / ``txt``).
    ``dtype``: stored moments fp32 / fp16 / bf16 (the encoder runs in the model's own dtype).
    ``engine="ray"``: a Ray Data pipeline (``ray_engine.py``, options in ``ray``). The default engine
    works in a plain process and under ``accelerate launch`` (accelerate.PartialState).
    """
    from accelerate import PartialState

    if shard_size < 1 or batch_size < 1:
        raise InputError("--shard-size and --batch-size must be >= 1")
    if engine not in ENGINES:
        raise InputError(f"--engine {engine!r}: choose one of {', '.join(ENGINES)}")
    store, variants, source = resolve_dtype(dtype), Variants.make(resolution, buckets, flip), open_source(data, caption_key)
    # cpu=True on a machine without CUDA: accelerate then forms a gloo group from torchrun/mpirun's env
    # (WORLD_SIZE, LOCAL_RANK) instead of silently running every process as rank 0 of 1
    state = PartialState(cpu=not torch.cuda.is_available())
    if engine == "ray" and state.num_processes > 1:
        raise InputError("--engine ray is one driver process with Ray workers; run it without accelerate launch")
    if engine == "default" and state.num_processes > 1 and next(vae.parameters()).device != state.device:
        vae = vae.to(state.device)  # one GPU per process under accelerate launch; alone, the model stays put
    job = Job(vae, Path(out), source, variants, cache_identity(vae, variants, dtype), store,
              next(vae.parameters()).device, state.process_index, state.num_processes,
              {"tiling": tiling, "tile_size": tile_size})
    # one job per output folder: a second one would interleave shards and race on manifest.json
    with output_lock(job.out, "encode") if state.is_main_process else contextlib.nullcontext():
        return _run_job(job, state, engine, overwrite, shard_size, batch_size, num_workers, progress, ray, dtype,
                        model_name)


def _run_job(job: Job, state: Any, engine: str, overwrite: bool, shard_size: int, batch_size: int, num_workers: int,
             progress: bool, ray: RayOptions | None, dtype: str, model_name: str | None) -> EncodeResult:
    """Every process: prepare OUT (main), encode this share, write its part; main merges the manifest."""
    vae, variants, source = job.vae, job.variants, job.source
    t0 = time.perf_counter()
    if state.is_main_process:
        prepare_out(job.out, job.identity, overwrite)
    state.wait_for_everyone()
    part = _run_share(job, engine, shard_size, batch_size, num_workers, progress, ray)
    save_json(part, job.out / f"part-r{job.rank:03d}.json")
    state.wait_for_everyone()
    if state.is_main_process:
        c = _merge(vae, job.out, job.world, job.identity, variants, dtype, source, model_name)["counts"]
        log.info("encode: %d samples (%d encoded, %d unchanged, %d skipped) in %.1f s -> %s", c["samples"],
                 c["encoded"], c["unchanged"], c["skipped"], time.perf_counter() - t0, job.out / "manifest.json")
    state.wait_for_everyone()
    c = json.loads((job.out / "manifest.json").read_text())["counts"]
    return EncodeResult(job.out, c["inputs"], c["samples"], c["encoded"], c["unchanged"], c["skipped"],
                        time.perf_counter() - t0, c["recaptioned"], c["no_caption"])


def _run_share(job: Job, engine: str, shard_size: int, batch_size: int, num_workers: int, progress: bool,
               ray: RayOptions | None) -> dict[str, Any]:
    """This process's share of the work, through ``engine``; returns its part of the manifest."""
    known = Known(job.out, job.rank)
    writer = ShardWriter(job.out, job.rank, known.next_seq, shard_size, job.identity)
    bar = progress_bar(job, progress)
    collector = Collector(known, writer, job.variants, bar)
    try:
        if engine == "ray":
            from .ray_engine import run_ray

            run_ray(job, known, collector, batch_size, ray or RayOptions())
        else:
            _run_local(job, known, collector, batch_size, num_workers)
    finally:
        bar.close()
        written = writer.close()  # a kill lands anywhere; an exception still saves the finished samples
    return dict(collector.part(written), rank=job.rank, world_size=job.world)


def _merge(vae, out: Path, world: int, identity: dict, variants: Variants, dtype: str, source: Source,
           model_name: str | None) -> dict[str, Any]:
    """Main process: parts of all ranks -> manifest.json; shards no entry points to are then deleted.

    Captions and metadata stay in the shard headers only (``LatentDataset`` reads them there)."""
    parts = [json.loads((out / f"part-r{r:03d}.json").read_text()) for r in range(world)]
    samples = sorted((e for p in parts for e in p["entries"]), key=lambda e: e["path"])
    no_caption = sum(1 for e in samples if not e.get("caption"))
    samples = [{k: v for k, v in e.items() if k not in ("caption", "metadata")} for e in samples]
    live = {e["shard"] for e in samples}
    shards = [p for p in out.glob("shard-r*.safetensors") if SHARD_RE.match(p.name)]  # names only: no header reads
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
        "transform": identity["transform"],
        "resolution": variants.resolutions[0] if variants.resolutions else None,
        "resolutions": variants.resolutions,
        "flip": "both" if variants.flip else "none",
        "buckets": [list(b) for b in variants.transforms[0].buckets],
        "source": source.describe(),
        "counts": {"inputs": sum(p["inputs"] for p in parts) + len(source.not_read), "samples": len(samples),
                   **{k: sum(p.get(k, 0) for p in parts) for k in ("encoded", "unchanged", "recaptioned", "duplicates", "oom_halvings")},
                   "skipped": sum(len(p["skipped"]) for p in parts) + len(source.not_read), "no_caption": no_caption, "world_size": world},
        "skipped": sorted([*(s for p in parts for s in p["skipped"]), *source.not_read],
                          key=lambda s: s["path"]),
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
