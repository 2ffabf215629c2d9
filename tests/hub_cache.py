"""A local Hugging Face Hub cache holding tiny models, in huggingface_hub's documented layout (no network).

https://huggingface.co/docs/huggingface_hub/guides/manage-cache: ``<cache>/models--<org>--<name>/`` with
``blobs/<hash>`` (the file contents), ``snapshots/<commit>/<path>`` (symlinks into blobs) and
``refs/<revision>`` (a file holding the commit hash). Tests point ``HF_HUB_CACHE`` (or ``HF_HOME``, whose
``hub/`` it is) at such a folder and check with ``huggingface_hub.scan_cache_dir`` that the library
itself reads it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_repo(cache: Path, repo_id: str, files: dict[str, Path | bytes], *, revision: str = "main") -> str:
    """Put ``files`` (path in the repo -> local file or bytes) into ``cache`` as one commit of ``repo_id``,
    named by ``refs/<revision>``; returns the commit hash."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    data = {rel: (src.read_bytes() if isinstance(src, Path) else src) for rel, src in sorted(files.items())}
    commit = hashlib.sha1(b"".join(rel.encode() + hashlib.sha256(b).digest() for rel, b in data.items())).hexdigest()
    for rel, b in data.items():
        blob = repo / "blobs" / hashlib.sha256(b).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(b)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit


def folder_files(folder: Path, prefix: str = "") -> dict[str, Path]:
    """Every file under ``folder`` as {prefix + relative path: file}, for ``cache_repo``."""
    return {prefix + p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
