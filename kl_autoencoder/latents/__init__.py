"""Latent caches for diffusion training: format, inputs (folders, webdataset tars, captions), the encode job and its
Ray engine, the dataset, buckets, statistics, latent files."""

from .buckets import BucketBatchSampler, Transform, make_buckets
from .dataset import LatentDataset
from .files import decode_latents, read_latents
from .format import FORMAT, CacheMismatchError, read_manifest
from .ray_engine import RayOptions
from .stats import (
    LatentStats,
    compute_latent_stats,
    stats_of_cache,
    stats_of_folder,
    write_factors,
)
from .variants import Variants
from .writer import EncodeResult, encode_dataset

__all__ = [
    "FORMAT", "BucketBatchSampler", "CacheMismatchError", "EncodeResult", "LatentDataset", "LatentStats", "RayOptions",
    "Transform", "Variants", "compute_latent_stats", "decode_latents", "encode_dataset", "make_buckets", "read_latents",
    "read_manifest", "stats_of_cache", "stats_of_folder", "write_factors",
]
