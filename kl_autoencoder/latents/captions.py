"""Captions and per-sample metadata of image folders: ``metadata.jsonl`` / ``metadata.csv`` tables and sidecars.

Tables follow Hugging Face ``datasets``' ImageFolder convention: a ``metadata.jsonl`` (one JSON object
per line) or ``metadata.csv`` in the folder or any subfolder, whose ``file_name`` column is the image's
path relative to the table; the caption column is ``text`` unless ``caption_key`` names another; every
other column becomes the sample's metadata. Sidecars follow kohya-ss sd-scripts and img2dataset's
``output_format="files"``: ``photo.txt`` (or ``photo.caption``) beside ``photo.jpg`` holds the caption,
``photo.json`` the metadata. A table row wins over sidecars. Webdataset tars carry the same pieces as
members (``key.txt``, ``key.json``): ``sources.py``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..utils.files import json_safe

TABLE_NAMES = ("metadata.jsonl", "metadata.csv")
Captioned = tuple[str | None, Any]  # (caption or None when there is none, JSON metadata)


class SampleError(InputError):
    """One sample cannot be used (bad sidecar, member or image); the message names it. The job skips it."""


@dataclass(frozen=True)
class CaptionRule:
    """Where a caption lives; ``key`` None: the usual places (``text`` column, ``.txt``/``.caption`` sidecar, ``txt`` member)."""

    key: str | None = None

    @property
    def column(self) -> str:
        return self.key or "text"

    @property
    def sidecar_suffixes(self) -> tuple[str, ...]:
        return (f".{self.key}",) if self.key else (".txt", ".caption")

    @property
    def member(self) -> str:
        return self.key or "txt"


def decode_text(data: bytes, name: str) -> str:
    """UTF-8 caption bytes (a BOM allowed) -> text without surrounding whitespace; SampleError otherwise."""
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise SampleError(f"{name}: caption is not UTF-8 text ({e.reason} at byte {e.start})") from None


def decode_json(data: bytes, name: str) -> Any:
    """JSON metadata bytes -> value (NaN/inf become null: standard JSON only); SampleError otherwise."""
    try:
        return json_safe(json.loads(data.decode("utf-8-sig")))
    except (UnicodeDecodeError, ValueError) as e:
        raise SampleError(f"{name}: metadata is not JSON ({str(e).splitlines()[0]})") from None


def sidecar(image: Path, rule: CaptionRule) -> Captioned:
    """Caption and metadata from the files beside ``image`` (missing ones: None and {})."""
    caption, metadata = None, {}
    for suffix in rule.sidecar_suffixes:
        p = image.with_suffix(suffix)
        if p.is_file():
            caption = decode_text(_read(p), str(p))
            break
    p = image.with_suffix(".json")
    if p.is_file():
        metadata = decode_json(_read(p), str(p))
    return caption, metadata


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise SampleError(f"{path}: unreadable ({e.strerror or e})") from None


def read_tables(root: Path, rule: CaptionRule) -> dict[str, Captioned]:
    """Every metadata table under ``root``: image path relative to ``root`` -> (caption, other columns).

    Raises InputError naming the table and line for a malformed table (before any work starts).
    """
    out: dict[str, Captioned] = {}
    tables = sorted(p for name in TABLE_NAMES for p in root.rglob(name) if p.is_file())
    dirs = [t.parent for t in tables]
    if len(set(dirs)) < len(dirs):
        both = next(d for d in dirs if dirs.count(d) > 1)
        raise InputError(f"{both}: holds both metadata.jsonl and metadata.csv; keep one")
    for table in tables:
        for line, row in _rows(table):
            name = row.pop("file_name", None)
            if not isinstance(name, str) or not name:
                raise InputError(f"{table} line {line}: no file_name (the image's path relative to the table)")
            try:
                rel = (table.parent / name).resolve().relative_to(root.resolve()).as_posix()
            except ValueError:
                raise InputError(f"{table} line {line}: {name} is outside {root}") from None
            if rel in out:
                raise InputError(f"{table} line {line}: {name} is listed twice")
            caption = row.pop(rule.column, None)
            out[rel] = (None if caption is None else str(caption).strip(), json_safe(row))
    return out


def _csv_rows(table: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    """Rows with the line each ends on (quoted captions may span lines); a row longer than the header is refused."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    for r in reader:
        if None in r:
            raise InputError(f"{table} line {reader.line_num}: more fields than the header has columns")
        rows.append((reader.line_num, dict(r)))
    return rows


def _rows(table: Path) -> list[tuple[int, dict[str, Any]]]:
    try:
        text = table.read_text(encoding="utf-8-sig")
        if table.suffix == ".csv":
            return _csv_rows(table, text)
    except (UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{table}: not a readable UTF-8 table ({e})") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise InputError(f"{table} line {i}: not JSON ({e})") from None
        if not isinstance(row, dict):
            raise InputError(f"{table} line {i}: expected a JSON object with file_name, got {type(row).__name__}")
        rows.append((i, row))
    return rows
