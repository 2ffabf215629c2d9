"""``--engine ray``: the encode job as a Ray Data pipeline, for clusters (the optional ``[ray]`` extra).

Stages (Anyscale's Stable Diffusion pre-training ran its VAE encode the same way, as a ``map_batches``
actor pool):
  read    Ray tasks: ``ray.data.from_items`` of work items (a chunk of files, or one whole tar) ->
          ``map_batches(_read_items)``: the default engine's ``encoding.prepare`` on every sample, so
          samples already in shards come out "unchanged" and never reach a model;
  encode  ``map_batches(RayEncoder)`` on an ``ActorPoolStrategy`` pool: one model per actor,
          ``num_gpus`` per actor when the cluster has GPUs; ``encoding.encode_records`` per bucket;
  write   the driver iterates the results into the default engine's ``Collector`` / ``ShardWriter``:
          the same shards, manifest and resume rules; only the driver needs the output folder.
Faults: Ray restarts a crashed actor and retries its task (Ray Data's actor defaults, max_restarts=-1,
max_task_retries=-1). If the pipeline fails anyway (an actor killed for good, a node lost), it runs
again over the work items not yet delivered, excluding the samples already taken, up to ``retries``
times; the Collector drops any path it already holds, so every sample is stored once.
Cluster: ``ray.init()`` joins ``RAY_ADDRESS`` (or ``address``) when set, else starts a local cluster
(shut down again at the end). Inputs must be readable by every node: a shared file system or URLs.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..errors import InputError
from .encoding import encode_records, group_key, log_split, prepare
from .sources import source_from_json
from .variants import Variants

if TYPE_CHECKING:
    from .encoding import Job
    from .shards import Collector, Known

log = logging.getLogger("kl_autoencoder")
FILES_PER_ITEM = 64  # a folder's files per read task; a tar is always one item
ROWS_PER_BLOCK = 16  # records per block leaving a read task: bounded memory for big tars


@dataclass
class RayOptions:
    """How the pipeline uses the cluster (None: chosen from ``ray.cluster_resources()``, see ``plan``)."""

    actors: int | None = None  # encoder actors; default one per GPU, else CPUs // 4 (at least 1)
    cpus_per_actor: float | None = None  # default 1 with GPUs; else 3/4 of the CPUs shared by the actors
    gpus_per_actor: float | None = None  # default 1 when the cluster has GPUs
    read_cpus: float | None = None  # CPUs per read task; default what the actors leave, at most 1
    retries: int = 3  # pipeline reruns after a failure Ray could not recover from
    address: str | None = None  # ray.init(address=...); None: RAY_ADDRESS, else a local cluster
    encoder_cls: type | None = None  # a RayEncoder subclass (e.g. to add logging or health checks)


def plan(opts: RayOptions, resources: dict[str, float]) -> dict[str, float]:
    """Actor count and per-actor / per-read-task resources for a cluster with ``resources``."""
    cpus, gpus = float(resources.get("CPU", 1)), float(resources.get("GPU", 0))
    gpu_each = opts.gpus_per_actor if opts.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    actors = opts.actors or (int(gpus // gpu_each) if gpu_each else max(1, int(cpus) // 4))
    cpu_each = opts.cpus_per_actor or (1.0 if gpu_each else max(0.25, cpus * 0.75 / actors))
    free = cpus - actors * cpu_each
    read = opts.read_cpus or min(1.0, free)
    if actors < 1 or read <= 0 or free < read - 1e-9:
        raise InputError(f"the Ray cluster has {cpus:g} CPUs: {actors} actors x {cpu_each:g} CPUs leave none for "
                         "reading; lower RayOptions.actors / cpus_per_actor (CLI: --ray-actors, --ray-cpus-per-actor)")
    return {"actors": actors, "cpus_per_actor": cpu_each, "gpus_per_actor": gpu_each, "read_cpus": read}


# ----------------------------------------------------------------------------- rows between the stages


def _record_row(record: dict[str, Any], item: int) -> tuple[str, bytes]:
    """A record as (JSON without pixels, the crops' uint8 bytes one after the other)."""
    pixels = record.pop("pixels", [])
    record["item"] = item
    return json.dumps(record), b"".join(p.numpy().tobytes() for p in pixels)


def _pixels(record: dict[str, Any], data: bytes) -> list[torch.Tensor]:
    """The inverse of ``_record_row``'s bytes: per variant (h, w, 3) uint8, shapes from the buckets (w, h)."""
    out, at = [], 0
    for w, h in record["buckets"]:
        n = h * w * 3
        out.append(torch.frombuffer(bytearray(data[at : at + n]), dtype=torch.uint8).view(h, w, 3))
        at += n
    return out


def _columns(rows: list[tuple[str, bytes]], name: str) -> dict[str, np.ndarray]:
    return {"record": np.array([r for r, _ in rows], dtype=object), name: np.array([b for _, b in rows], dtype=object)}


def _read_items(batch: dict[str, np.ndarray], variants: Variants) -> Iterator[dict[str, np.ndarray]]:
    """Read task: work items -> record rows, then one "item-done" row per item (it tells the driver
    that everything of the item has arrived, so a rerun after a failure can leave the item out)."""
    for text in batch["item"]:
        item = json.loads(text)
        source = source_from_json(item["source"])
        known = {p: {sha: set(d) for sha, d in shas.items()} for p, shas in item["known"].items()}
        exclude, rows = set(item["exclude"]), []
        for unit in source.units:
            for raw in source.read(unit):
                if raw.path not in exclude:
                    rows.append(_record_row(prepare(raw, known, variants), item["item"]))
                if len(rows) >= ROWS_PER_BLOCK:
                    yield _columns(rows, "pixels")
                    rows = []
        rows.append((json.dumps({"status": "item-done", "item": item["item"]}), b""))
        yield _columns(rows, "pixels")


class RayEncoder:
    """One model per actor: record rows -> the same rows with the moments of the new ones (safetensors bytes)."""

    def __init__(self, model: list, variants: Variants, store: str, encode_kw: dict[str, Any], batch_size: int,
                 cpus: float) -> None:
        import ray

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # Ray sets CUDA_VISIBLE_DEVICES
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(cpus + 0.5)))  # this actor's share of the node
        self.vae = ray.get(model[0]).to(self.device).eval()
        self.variants, self.store, self.encode_kw, self.batch_size = variants, getattr(torch, store), encode_kw, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = [json.loads(r) for r in batch["record"]]
        blobs = [b""] * len(records)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(records):
            if r["status"] == "new":
                r["pixels"] = _pixels(r, batch["pixels"][i])
                groups.setdefault(group_key(r), []).append(i)
        for idx in groups.values():
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s : s + self.batch_size]
                splits: list[int] = []
                moments = encode_records(self.vae, [records[i] for i in chunk], self.variants, self.store, self.device,
                                         self.encode_kw, on_split=lambda b, h: (log_split(b, h), splits.append(b)))
                if splits:  # counted by the driver into the manifest, as the default engine does
                    records[chunk[0]]["oom_halvings"] = len(splits)
                for i, m in zip(chunk, moments):
                    blobs[i] = save_tensors({f"{sfx}.{k}": t for sfx, (mean, logvar) in m.items()
                                             for k, t in (("mean", mean), ("logvar", logvar))})
        rows = [(json.dumps({k: v for k, v in r.items() if k != "pixels"}), b) for r, b in zip(records, blobs)]
        return _columns(rows, "moments")


def _moments(blob: bytes) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    t = load_tensors(blob)
    return {name[: -len(".mean")]: (t[name], t[name[: -len(".mean")] + ".logvar"]) for name in t if name.endswith(".mean")}


# ----------------------------------------------------------------------------- the driver


def _items(job: Job, known: Known) -> list[dict[str, Any]]:
    """Work items: whole tars, or chunks of FILES_PER_ITEM files; each with the stored digests of its samples."""
    units, folder = job.units, job.source.kind == "folder"
    digests = known.digests()
    by_unit: dict[str, list[str]] = {}  # tar name -> stored paths of its samples
    for path, entries in known.entries.items():
        by_unit.setdefault(entries[0].get("tar", path), []).append(path)
    items = []
    for i, s in enumerate(range(0, len(units), FILES_PER_ITEM if folder else 1)):
        chunk = units[s : s + (FILES_PER_ITEM if folder else 1)]
        paths = chunk if folder else [p for u in chunk for p in by_unit.get(job.source.names[u], [])]
        mine = {p: {sha: sorted(d) for sha, d in digests[p].items()} for p in paths if p in digests}
        items.append({"item": i, "source": job.source.subset_json(chunk), "known": mine})
    return items


def _pipeline(job: Job, items: list[dict[str, Any]], model_ref: Any, batch_size: int, res: dict[str, float],
              encoder_cls: type):
    import ray.data

    ds = ray.data.from_items([{"item": json.dumps(it)} for it in items], override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(_read_items, batch_size=1, num_cpus=res["read_cpus"], fn_kwargs={"variants": job.variants})
    store = str(job.store).removeprefix("torch.")
    return ds.map_batches(
        encoder_cls, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=int(res["actors"])),
        num_cpus=res["cpus_per_actor"], num_gpus=res["gpus_per_actor"] or None,
        fn_constructor_kwargs={"model": [model_ref], "variants": job.variants, "store": store,
                               "encode_kw": job.encode_kw, "batch_size": batch_size, "cpus": res["cpus_per_actor"]},
    )


def run_ray(job: Job, known: Known, collector: Collector, batch_size: int, opts: RayOptions) -> None:
    """Encode ``job.units`` on a Ray cluster into ``collector`` (see module doc)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise InputError("--engine ray needs Ray: pip install 'kl-autoencoder[ray]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=opts.address)
    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False  # ours (images/s, skipped) is the one bar
    try:
        res = plan(opts, ray.cluster_resources())
        log.info("ray: %d encoder actors x (%g CPU, %g GPU), read tasks %g CPU", res["actors"], res["cpus_per_actor"],
                 res["gpus_per_actor"], res["read_cpus"])
        vae = job.vae if next(job.vae.parameters()).device.type == "cpu" else copy.deepcopy(job.vae).cpu()
        model_ref = ray.put(vae)  # held here for the whole run: restarted actors read it again
        items = _items(job, known)
        delivered: dict[int, set[str]] = {it["item"]: set() for it in items}
        finished: set[int] = set()
        failures = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                    ray.exceptions.ObjectLostError, ray.exceptions.LocalRayletDiedError)
        for attempt in range(opts.retries + 1):
            todo = [dict(it, exclude=sorted(delivered[it["item"]])) for it in items if it["item"] not in finished]
            if not todo:
                return
            try:
                _drain(_pipeline(job, todo, model_ref, batch_size, res, opts.encoder_cls or RayEncoder),
                       collector, delivered, finished)
                return
            except failures as e:
                if attempt == opts.retries:
                    raise
                log.warning("ray: the pipeline failed (%s); running it again over the %d unfinished work items",
                            type(e).__name__, len(items) - len(finished))
    finally:
        ctx.enable_progress_bars = bars
        if started:
            ray.shutdown()


def _drain(ds: Any, collector: Collector, delivered: dict[int, set[str]], finished: set[int]) -> None:
    """Driver: result rows -> the Collector (which writes the shards); remembers what has arrived."""
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for text, blob in zip(batch["record"], batch["moments"]):
            record = json.loads(text)
            if record["status"] == "item-done":
                finished.add(record["item"])
                continue
            collector.counts["oom_halvings"] += record.pop("oom_halvings", 0)  # this record's batch halved on OOM
            collector.take(record, _moments(blob) if record["status"] == "new" else None)
            delivered[record["item"]].add(record["path"])
