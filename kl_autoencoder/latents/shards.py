"""The shards of an encode output folder: writing them whole, finding the finished work in them, and one
process's bookkeeping of what it kept, wrote and skipped (the same under every engine).

A shard is written to a temp file, fsynced, then renamed, so a shard on disk is always whole; shards
are the record of finished work: a rerun reads their headers (``Known``) and encodes only inputs with
no entry of the same path and sha256, so a kill at any moment loses at most the shard being filled.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..utils.files import atomic_path, disk_full_says, save_json
from .encoding import Digests, Moments, stored_meta, text_digest
from .format import FORMAT, SHARD_RE, CacheMismatchError, load_manifest, moment_names, scan_shards
from .variants import Variants

log = logging.getLogger("kl_autoencoder")


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    need = sum(t.numel() * t.element_size() for t in tensors.values())
    # a full disk: one line with the space needed; the temp file goes, finished shards stay, a rerun resumes
    with disk_full_says(path, need, "a latent shard"), atomic_path(path) as tmp:  # fsynced before it has its name
        save_file(tensors, str(tmp), metadata=metadata)


class ShardWriter:
    """Buffers samples and writes full shards in one background thread (overlaps the encoder)."""

    def __init__(self, out: Path, rank: int, seq: int, shard_size: int, identity: dict[str, Any]) -> None:
        self.out, self.rank, self.seq, self.shard_size = out, rank, seq, shard_size
        self.identity = json.dumps(identity, sort_keys=True)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self.pending: Future | None = None
        self.tensors: dict[str, torch.Tensor] = {}
        self.samples: list[dict[str, Any]] = []
        self.written: list[dict[str, Any]] = []  # entries whose shard is on disk

    def add(self, meta: dict[str, Any], moments: Moments) -> None:
        """One sample: header fields and its moments per variant suffix ("" = primary)."""
        key = str(len(self.samples))
        for suffix, (mean, logvar) in moments.items():
            names = moment_names(key, suffix)
            self.tensors[names[0]], self.tensors[names[1]] = mean, logvar
        self.samples.append(dict(meta, key=key, shape=list(moments[""][0].shape)))
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


class Known:
    """Entries already in shards (path -> entries, with their shard) and a rank's next shard number."""

    def __init__(self, out: Path, rank: int) -> None:
        self.out = out
        self.entries: dict[str, list[dict[str, Any]]] = {}
        self.next_seq = 0
        for p, _, samples in scan_shards(out):
            for s in samples:
                self.entries.setdefault(s["path"], []).append(dict(s, shard=p.name))
            m = SHARD_RE.match(p.name)
            if int(m.group(1)) == rank:
                self.next_seq = max(self.next_seq, int(m.group(2)) + 1)

    def digests(self) -> Digests:
        """What ``encoding.prepare`` needs to tell unchanged inputs: path -> sha256 -> text digests."""
        out: Digests = {}
        for path, entries in self.entries.items():
            for e in entries:
                out.setdefault(path, {}).setdefault(e["sha256"], set()).add(text_digest(e.get("caption"), e.get("metadata", {})))
        return out

    def match(self, record: dict[str, Any]) -> dict[str, Any]:
        """The stored entry of a record's path and bytes; one with the same caption and metadata if any."""
        same = [e for e in self.entries[record["path"]] if e["sha256"] == record["sha256"]]
        digest = text_digest(record.get("caption"), record.get("metadata", {}))
        return next((e for e in same if text_digest(e.get("caption"), e.get("metadata", {})) == digest), same[-1])

    def moments(self, entry: dict[str, Any], variants: Variants) -> Moments:
        """The stored moments of every variant of ``entry`` (to copy them under a new caption)."""
        with safe_open(str(self.out / entry["shard"]), framework="pt") as f:
            out = {}
            for index, flipped in variants.each():
                suffix = variants.suffix(index, flipped)
                mean, logvar = moment_names(entry["key"], suffix)
                out[suffix] = (f.get_tensor(mean), f.get_tensor(logvar))
            return out


class Collector:
    """One process's outcome: entries kept from earlier runs, samples written, inputs skipped, with counts.

    ``take`` receives every record exactly as the engine delivers it; a path it has already taken in this
    run is counted in ``duplicates`` and dropped, so a retried Ray task can never store a sample twice.
    """

    def __init__(self, known: Known, writer: ShardWriter, variants: Variants, bar: Any) -> None:
        self.known, self.writer, self.variants, self.bar = known, writer, variants, bar
        self.kept: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []
        self.done: set[str] = set()
        self.counts = {"inputs": 0, "encoded": 0, "unchanged": 0, "recaptioned": 0, "duplicates": 0, "oom_halvings": 0}

    def take(self, record: dict[str, Any], moments: Moments | None = None) -> None:
        status, path = record["status"], record["path"]
        if path in self.done:
            self.counts["duplicates"] += 1
            return
        self.done.add(path)
        self.counts["inputs"] += 1
        if status == "skipped":
            log.warning("skipped %s", record["reason"])
            self.skipped.append({"path": path, "reason": record["reason"]})
        elif status == "unchanged":
            self.kept.append(self.known.match(record))
            self.counts["unchanged"] += 1
        elif status == "recaption":  # same image bytes, new caption or metadata: copy the moments
            old = self.known.match(record)
            meta = {k: v for k, v in old.items() if k not in ("key", "shard", "shape")}
            self.writer.add(dict(meta, caption=record["caption"], metadata=record["metadata"]), self.known.moments(old, self.variants))
            self.counts["recaptioned"] += 1
        else:
            self.writer.add(stored_meta(record), moments)
            self.counts["encoded"] += 1
        self.bar.update(1)
        self.bar.set_postfix(skipped=len(self.skipped), unchanged=self.counts["unchanged"], refresh=False)

    def part(self, written: list[dict[str, Any]]) -> dict[str, Any]:
        """This process's share of the manifest (``part-rNNN.json``)."""
        return dict(self.counts, entries=self.kept + written, skipped=self.skipped)


def prepare_out(out: Path, identity: dict[str, Any], overwrite: bool) -> None:
    """Main process, before the others start: refuse (or clear) a cache made differently."""
    out.mkdir(parents=True, exist_ok=True)
    for p in out.glob(".shard-*.tmp"):
        p.unlink()  # a write that a kill interrupted; its samples were never reported as done
    manifest = out / "manifest.json"
    ours = [p for p in out.iterdir() if SHARD_RE.match(p.name) or p.name == "manifest.json" or p.name.startswith("part-r")]
    if overwrite:
        for p in ours:
            p.unlink()
    old = load_manifest(manifest) if manifest.is_file() else None
    if manifest.is_file() and old is None:
        log.warning("%s: not valid JSON (cut short?); rewriting it from the shards", manifest)
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
