"""Hugging Face Hub ids as MODEL: resolved through ``huggingface_hub`` and its cache, as diffusers does.

``AutoencoderKL.from_pretrained("org/name", subfolder=..., revision=...)`` fetches ``config.json`` with
``hf_hub_download`` and then the weights, ``diffusion_pytorch_model.safetensors`` before ``.bin``
(diffusers utils/hub_utils.py ``_get_model_file``), from the cache (``HF_HUB_CACHE``, default
``$HF_HOME/hub``: ``models--org--name/snapshots/<commit>/...`` with ``refs/<revision>`` naming the commit)
or from the Hub, with ``local_files_only`` when ``HF_HUB_OFFLINE=1``. ``hub_vae_folder`` makes the same
calls and returns the snapshot folder holding the VAE, which loads like any local diffusers folder:

* a VAE repo (``stabilityai/sd-vae-ft-mse``: config.json at the top) is the folder itself; a pipeline
  repo (``model_index.json``, the VAE in ``vae/``) resolves to its ``vae`` subfolder, as diffusers'
  ``subfolder="vae"``; ``subfolder=`` picks one explicitly;
* offline (``HF_HUB_OFFLINE=1`` or ``offline=True`` / ``--offline``) nothing but the cache is read, and a
  cache miss is one line naming the repo, revision and missing files.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import InputError

CONFIG_NAME = "config.json"
# diffusers utils/constants.py SAFETENSORS_WEIGHTS_NAME then WEIGHTS_NAME: the order from_pretrained tries them
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# A Hub repo id: owner/name, letters, digits, '-', '_', '.' (huggingface_hub validate_repo_id); no '--' or '..'
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin", ".pth", ".yaml", ".yml", ".json", ".png", ".jpg", ".jpeg", ".webp")


class HubError(InputError):
    """A hub id that cannot be resolved: not cached while offline, no such repo or revision, no VAE in it."""


def looks_like_repo_id(spec: str) -> bool:
    """``org/name`` that is not a local path (the caller checks existence first) nor a file name."""
    s = str(spec)
    return bool(_REPO_ID.match(s)) and "--" not in s and ".." not in s and not s.lower().endswith(_FILE_SUFFIXES)


def hub_offline(offline: bool | None = None) -> bool:
    """``offline``, else ``HF_HUB_OFFLINE`` (huggingface_hub's constant, read at import, or the variable now)."""
    from huggingface_hub import constants

    if offline:
        return True
    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


ABSENT, UNCACHED = "absent", "uncached"


def _download(repo_id: str, filename: str, revision: str | None, offline: bool) -> Path | str:
    """``hf_hub_download`` of one file: its local path, or ABSENT (the Hub says the repo has no such file) or
    UNCACHED (not in the cache, and offline or the Hub unreachable). Repo, revision and access errors become
    one-line HubErrors."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=offline))
    except LocalEntryNotFoundError:
        return UNCACHED
    except RemoteEntryNotFoundError:
        return ABSENT
    except GatedRepoError:
        raise HubError(f"{repo_id}: a gated repository; accept its conditions on huggingface.co and log in "
                       "(`hf auth login`), then run again") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo_id}: no such model repository on the Hugging Face Hub (or it is private: log in with "
                       "`hf auth login`); and no local folder or file of that name") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id}: no revision {revision!r} on the Hub") from None


def _is_vae_config(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("_class_name") in ("AutoencoderKL", "AutoencoderKLFlux2")
    except (OSError, ValueError, AttributeError):
        return False


def _missing(repo_id: str, revision: str | None, offline: bool, files: list[str]) -> HubError:
    rev = f" at revision {revision}" if revision else ""
    how = "offline (HF_HUB_OFFLINE=1 or --offline)" if offline else "and the Hub could not be reached"
    return HubError(
        f"{repo_id}{rev}: no local folder or file of that name, and not in the Hugging Face cache {_cache_dir()} {how}: "
        f"missing {' or '.join(files)}; download it once online (`hf download {repo_id}`) or point HF_HUB_CACHE/HF_HOME "
        "at a cache that has it"
    )


def hub_vae_folder(repo_id: str, *, revision: str | None = None, subfolder: str | None = None,
                   offline: bool | None = None) -> Path:
    """The local folder (in the Hugging Face cache) holding the VAE of hub repo ``repo_id``: config.json and
    weights, downloaded first when online. See the module doc for which folder and what offline means."""
    offline = hub_offline(offline)
    subs = [subfolder.strip("/")] if subfolder is not None else ["", "vae"]
    tried, results = [], []
    for sub in subs:
        name = f"{sub}/{CONFIG_NAME}" if sub else CONFIG_NAME
        cfg = _download(repo_id, name, revision, offline)
        tried.append(name)
        results.append(cfg)
        if isinstance(cfg, Path) and (subfolder is not None or _is_vae_config(cfg)):
            break
    else:
        if UNCACHED in results:
            raise _missing(repo_id, revision, offline, tried)
        raise HubError(f"{repo_id}: neither a VAE repo (config.json of an AutoencoderKL) nor a pipeline with a vae/ "
                       "folder; give the repo of the VAE itself")
    prefix = f"{sub}/" if sub else ""
    results = []
    for w in WEIGHTS_NAMES:  # safetensors, else .bin, as diffusers' _get_model_file
        results.append(_download(repo_id, prefix + w, revision, offline))
        if isinstance(results[-1], Path):
            return cfg.parent
    if UNCACHED in results:
        raise _missing(repo_id, revision, offline, [prefix + w for w in WEIGHTS_NAMES])
    raise HubError(f"{repo_id}: {prefix or 'the repo'} has no {' or '.join(WEIGHTS_NAMES)}")
