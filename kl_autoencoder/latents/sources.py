"""Where an encode job's samples come from: an image folder or webdataset tars, read unit by unit.

DATA is one of
  * a folder: every image under it (recursive); captions from ``metadata.jsonl`` / ``metadata.csv`` or
    sidecar files (``captions.py``). A folder with no images but ``*.tar`` files is read as those tars;
  * one image file;
  * webdataset tars, read with the ``webdataset`` library: a path, a glob (``shards/*.tar``), a brace
    pattern (``shards/{00000..00127}.tar``), several joined with ``::``, or a URL webdataset opens itself
    (``pipe:CMD``, ``http(s)://...``). Samples are img2dataset's members: ``key.jpg`` (or png, webp, ...),
    ``key.txt`` the caption, ``key.json`` the metadata.
The work is split in units that one process (or Ray task) reads whole: a file of a folder, a tar of a
webdataset, so under ``accelerate launch`` each process takes whole tars. Reading a unit yields
``RawSample``s; a sample or tar that cannot be read becomes a RawSample with ``error`` set, never an
exception, so one bad member never stops a job.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Iterator, Sequence
from urllib.parse import urlparse

from ..errors import InputError
from ..utils.images import IMAGE_EXTENSIONS, log_skipped, scan_images
from .captions import Captioned, CaptionRule, SampleError, decode_json, decode_text, read_tables, sidecar

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
URL_RE = re.compile(r"^(pipe:|[a-zA-Z][a-zA-Z0-9+.-]*://)")
IMAGE_MEMBERS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)  # preference order when a sample has several


@dataclass
class RawSample:
    """One sample as read, before hashing and decoding."""

    path: str  # its name in the cache: the file relative to the folder, or TAR/KEY
    name: str = ""  # in messages: the file, or TAR/KEY.jpg
    data: bytes | None = None  # the image file's bytes
    caption: str | None = None  # None: the sample has none (stored as "" and counted)
    metadata: Any = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)  # webdataset: {"tar": ..., "tar_key": ...}
    error: str | None = None  # why it is skipped; the message names the file or tar and key


@dataclass
class FolderSource:
    """Image files under ``root`` (or ``root`` itself, one file); one unit per file."""

    kind: ClassVar[str] = "folder"
    root: Path
    units: list[str]  # paths relative to root ("" when root is a file)
    tables: dict[str, Captioned]
    rule: CaptionRule
    not_read: list[dict[str, str]] = field(default_factory=list)  # entries the folder scan skipped, with why

    def read(self, unit: str) -> Iterator[RawSample]:
        path = self.root / unit if unit else self.root
        try:
            data = path.read_bytes()
        except OSError as e:
            listed = " (listed in a metadata table)" if unit in self.tables else ""
            yield RawSample(unit, error=f"{path}: unreadable ({e.strerror or e}){listed}")
            return
        try:
            caption, metadata = self.tables[unit] if unit in self.tables else sidecar(path, self.rule)
        except SampleError as e:
            yield RawSample(unit, error=str(e))
            return
        yield RawSample(unit, str(path), data, caption, metadata)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "data": str(self.root), "units": len(self.units)}

    def subset_json(self, units: list[str]) -> dict[str, Any]:
        """What a worker needs to read ``units`` only, as JSON (a Ray task's input row)."""
        tables = {u: list(self.tables[u]) for u in units if u in self.tables}
        return {"kind": self.kind, "root": str(self.root), "units": units, "tables": tables, "caption_key": self.rule.key}


@dataclass
class TarSource:
    """Webdataset tars; one unit per tar. ``names``: url -> the tar's name in sample paths."""

    kind: ClassVar[str] = "webdataset"
    units: list[str]
    names: dict[str, str]
    rule: CaptionRule
    not_read: list[dict[str, str]] = field(default_factory=list)  # as FolderSource's; tars list nothing up front

    def read(self, url: str) -> Iterator[RawSample]:
        """The tar's samples. A damaged tar (truncated, bad header) yields what precedes the damage, drops
        the sample being assembled when it broke (its members after the damage, if any, are lost; whether
        there were any cannot be told), and ends with one RawSample naming the tar."""
        import webdataset as wds

        tar = self.names[url]
        errors: list[str] = []

        def handler(exn: Exception) -> bool:  # webdataset calls it for each error; True: carry on
            errors.append(_reason(exn))
            return True

        reported = 0
        for s in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=handler)):
            path, extra = f"{tar}/{s['__key__']}", {"tar": tar, "tar_key": s["__key__"]}
            if len(errors) > reported:  # group_by_keys yields the sample it was assembling when the error hit
                reported = len(errors)
                yield RawSample(path, extra=extra, error=f"{path}: may be incomplete, the tar is damaged after it ({errors[-1]})")
                continue
            yield self._sample(path, extra, s)
        if errors:
            yield RawSample(tar, error=f"{tar}: damaged tar, read up to the damage ({errors[0]})")

    def _sample(self, path: str, extra: dict[str, str], s: dict[str, Any]) -> RawSample:
        ext = next((e for e in IMAGE_MEMBERS if e in s), None)
        if ext is None:
            members = sorted(k for k in s if not k.startswith("__"))
            return RawSample(path, extra=extra, error=f"{path}: no image member (has {', '.join(members) or 'nothing'})")
        member = self.rule.member
        try:
            caption = decode_text(s[member], f"{path}.{member}") if member in s else None
            metadata = decode_json(s["json"], f"{path}.json") if "json" in s else {}
        except SampleError as e:
            return RawSample(path, extra=extra, error=str(e))
        return RawSample(path, f"{path}.{ext}", s[ext], caption, metadata, extra)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "tars": [self.names[u] for u in self.units]}

    def subset_json(self, units: list[str]) -> dict[str, Any]:
        """What a worker needs to read ``units`` only, as JSON (a Ray task's input row)."""
        return {"kind": self.kind, "units": units, "names": {u: self.names[u] for u in units}, "caption_key": self.rule.key}


Source = FolderSource | TarSource


def source_from_json(d: dict[str, Any]) -> Source:
    """The inverse of ``subset_json``."""
    rule = CaptionRule(d["caption_key"])
    if d["kind"] == FolderSource.kind:
        return FolderSource(Path(d["root"]), d["units"], {u: tuple(v) for u, v in d["tables"].items()}, rule)
    return TarSource(d["units"], d["names"], rule)


def _reason(exn: Exception) -> str:
    """One line from an exception webdataset passes on (it appends ' @ <stream>' and the url to the args)."""
    if isinstance(exn, OSError) and exn.strerror:
        return exn.strerror
    first = str(exn.args[0]) if exn.args else ""
    first = first.split(" @ ")[0].splitlines()[0] if first else ""
    return f"{type(exn).__name__}: {first}" if first else type(exn).__name__


def is_tar_spec(data: str) -> bool:
    """Whether DATA names tars rather than a folder: a URL, a glob / brace pattern, ``::`` lists, a .tar path."""
    return bool(URL_RE.match(data)) or "::" in data or data.endswith(TAR_SUFFIXES) or any(c in data for c in "{*?[")


def open_source(data: str | Path | Sequence[str | Path], caption_key: str | None = None) -> Source:
    """DATA (see module doc) -> its source; InputError / FileNotFoundError naming what is missing."""
    rule = CaptionRule(caption_key)
    if isinstance(data, (list, tuple)):
        return _tars(expand_tar_specs([str(d) for d in data]), rule)
    spec, path = str(data), Path(data)
    if path.is_dir():
        files, others = scan_images(path)
        tables = read_tables(path, rule)
        if files or tables:
            log_skipped(others, path)  # what is neither an image nor a sidecar, said once (not for a folder of tars)
            rels = {p.relative_to(path).as_posix() for p in files}
            skipped = [{"path": rel, "reason": f"{p}: {why}"} for p, why in others
                       if (rel := p.relative_to(path).as_posix()) not in tables]  # a table's row is read as a unit
            return FolderSource(path, sorted(rels | set(tables)), tables, rule, skipped)
        tars = sorted(str(p) for p in path.iterdir() if p.name.endswith(TAR_SUFFIXES))
        if tars:
            return _tars(tars, rule)
        raise FileNotFoundError(f"{path}: no images (extensions {', '.join(IMAGE_EXTENSIONS)}) and no .tar shards")
    if path.is_file() and not spec.endswith(TAR_SUFFIXES):
        return FolderSource(path, [""], {}, rule)
    if path.is_file() or is_tar_spec(spec):
        return _tars(expand_tar_specs([spec]), rule)
    raise FileNotFoundError(f"{path}: no such file or folder")


def expand_tar_specs(specs: list[str]) -> list[str]:
    """Brace patterns and ``::`` lists (webdataset's own expansion), then local globs; local files must exist."""
    from webdataset.shardlists import expand_urls

    out: list[str] = []
    for spec in specs:
        for url in expand_urls(spec):
            if URL_RE.match(url):
                out.append(url)
                continue
            found = sorted(glob.glob(url)) if any(c in url for c in "*?[") else [url]
            if not found:
                raise FileNotFoundError(f"{url}: no file matches (from {spec})")
            for f in found:
                if not Path(f).is_file():
                    raise FileNotFoundError(f"{f}: no such tar (from {spec})")
                if not f.endswith(TAR_SUFFIXES):
                    raise InputError(f"{f}: not a .tar shard (from {spec}); give tars, or a folder of images")
            out += found
    return list(dict.fromkeys(out))  # each once, in the given order


def tar_names(urls: list[str]) -> dict[str, str]:
    """url -> the tar's name in sample paths: its file name (``00000.tar``), which survives moving the shards;
    if two share a file name, local paths relative to their common folder, or the whole URLs."""
    names = {u: _file_name(u) for u in urls}
    if len(set(names.values())) == len(names):
        return names
    if not any(URL_RE.match(u) for u in urls):
        common = os.path.commonpath([os.path.abspath(u) for u in urls])
        return {u: Path(os.path.abspath(u)).relative_to(common).as_posix() for u in urls}
    return {u: u for u in urls}


def _file_name(url: str) -> str:
    if url.startswith("pipe:"):  # e.g. pipe:curl -s https://host/shards/00000.tar: the token naming the tar
        tokens = [t for t in url[5:].split() if ".tar" in t or ".tgz" in t]
        url = tokens[-1] if tokens else url
    return PurePosixPath(urlparse(url).path if URL_RE.match(url) else url).name or url


def _tars(urls: list[str], rule: CaptionRule) -> TarSource:
    if not urls:
        raise FileNotFoundError("no webdataset shards given")
    return TarSource(urls, tar_names(urls), rule)
