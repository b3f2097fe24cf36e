"""Latent cache: encode each training image once with the VAE, in memory or on disk.

`data.<ds>.cache_latents: memory | disk` (true = memory). Each entry holds the VAE posterior's mean and
std at the image's bucket (centre crop; a mirrored copy too when `flip` is on), so every step still draws
a fresh latent sample as the pixel path does. Disk entries are `<latent_cache_dir>/<key>.safetensors`,
key = sha1(image bytes, resize, crop, flip, VAE fingerprint): a changed image, size or VAE gets a new
key (rebuilt), an unchanged one is reused across runs. Under DDP, disk mode splits the encoding between
processes; memory mode encodes everything in every process.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import ImageOps

from ..training.checkpoints import load_safetensors, save_safetensors
from .dataset import resize_and_crop, to_tensor
from .images import load_rgb


def default_cache_dir() -> Path:
    root = os.environ.get("HCPDIFF_LIKE_CACHE", Path.home() / ".cache" / "hcpdiff_like")
    return Path(root) / "latents"


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """sha1 of the VAE's class, config, dtype and every weight: any change invalidates the cache."""
    digest = hashlib.sha1(type(vae).__name__.encode())
    config = dict(getattr(vae, "config", {}) or {})
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_digest(path: os.PathLike) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def entry_key(image_digest: str, assignment, flip: bool, fingerprint: str) -> str:
    text = f"{image_digest}|{assignment.resized}|{assignment.bucket}|centre|flip={flip}|{fingerprint}"
    return hashlib.sha1(text.encode()).hexdigest()


class LatentStore:
    """Cached posteriors per record index: in memory (`entries`) or as files (`paths`)."""

    def __init__(self, scaling_factor: float, shift_factor: Optional[float] = None):
        self.scaling_factor, self.shift_factor = float(scaling_factor), shift_factor
        self.entries: dict[int, dict[str, torch.Tensor]] = {}
        self.paths: dict[int, Path] = {}

    def tensors(self, index: int) -> dict[str, torch.Tensor]:
        if index in self.entries:
            return self.entries[index]
        return load_safetensors(self.paths[index])[0]

    def mean(self, index: int, flip: bool = False) -> torch.Tensor:
        """The scaled posterior mean (deterministic latent), for checks and evaluation."""
        entry = self.tensors(index)
        return self._scale(entry["mean_flipped" if flip and "mean_flipped" in entry else "mean"])

    def sample(self, index: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
        entry = self.tensors(index)
        suffix = "_flipped" if flip and "mean_flipped" in entry else ""
        mean, std = entry["mean" + suffix], entry["std" + suffix]
        return self._scale(mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype))

    def _scale(self, latents: torch.Tensor) -> torch.Tensor:
        if self.shift_factor is not None:
            latents = latents - self.shift_factor
        return latents * self.scaling_factor


@torch.no_grad()
def _encode(vae, device, dataset, indices: Sequence[int], batch_size: int, progress):
    """Yield (index, entry) for records `indices`, encoded in batches grouped by bucket (one size each)."""
    by_bucket: dict[tuple, list[int]] = {}
    for index in indices:
        by_bucket.setdefault(dataset.assignments[index].bucket, []).append(index)
    for group in by_bucket.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            images = []
            for index in chunk:
                image, _ = resize_and_crop(load_rgb(dataset.records[index].image_path, dataset.max_pixels),
                                           dataset.assignments[index])
                images.append(to_tensor(image))
                if dataset.flip:
                    images.append(to_tensor(ImageOps.mirror(image)))
            pixels = torch.stack(images).to(device, dtype=vae.dtype)
            posterior = vae.encode(pixels).latent_dist
            mean, std = posterior.mean.float().cpu(), posterior.std.float().cpu()
            per_image = 2 if dataset.flip else 1
            for position, index in enumerate(chunk):
                row = position * per_image
                entry = {"mean": mean[row].clone(), "std": std[row].clone()}
                if dataset.flip:
                    entry.update(mean_flipped=mean[row + 1].clone(), std_flipped=std[row + 1].clone())
                yield index, entry
            progress.update(len(chunk))


def cache_latents(handles, vae, device, accelerator=None, batch_size: int = 4, show_progress: bool = True) -> dict:
    """Build or load the latent cache of every dataset that asks for one (`handle.cache_mode`).
    Returns counts {"encoded": n, "reused": m}; sets `handle.dataset.latent_store`."""
    from tqdm.auto import tqdm

    stats = {"encoded": 0, "reused": 0}
    wanted = [h for h in handles if getattr(h, "cache_mode", None)]
    if not wanted:
        return stats
    vae.to(device)
    fingerprint = vae_fingerprint(vae)
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    scaling = getattr(vae.config, "scaling_factor", 0.18215)
    shift = getattr(vae.config, "shift_factor", None)
    for handle in wanted:
        dataset = handle.dataset
        store = LatentStore(scaling, shift)
        indices = list(range(len(dataset.records)))
        if handle.cache_mode == "disk":
            folder = Path(handle.cache_dir or default_cache_dir())
            folder.mkdir(parents=True, exist_ok=True)
            digests: dict[Path, str] = {}
            for index in indices:
                path = dataset.records[index].image_path
                if path not in digests:
                    digests[path] = file_digest(path)
                key = entry_key(digests[path], dataset.assignments[index], dataset.flip, fingerprint)
                store.paths[index] = folder / f"{key}.safetensors"
            missing = [i for i in indices if not store.paths[i].exists()]
            mine = missing[rank::world]
            with tqdm(total=len(mine), desc=f"caching latents ({handle.name})", unit="img",
                      disable=not show_progress or not mine, leave=False) as bar:
                for index, entry in _encode(vae, device, dataset, mine, batch_size, bar):  # written as they come
                    save_safetensors(entry, store.paths[index], {"image": str(dataset.records[index].image_path)})
            if accelerator is not None:
                accelerator.wait_for_everyone()
            encoded, reused = len(missing), len(indices) - len(missing)
        else:
            with tqdm(total=len(indices), desc=f"caching latents ({handle.name})", unit="img",
                      disable=not show_progress, leave=False) as bar:
                store.entries = dict(_encode(vae, device, dataset, indices, batch_size, bar))
            encoded, reused = len(indices), 0
        stats["encoded"] += encoded
        stats["reused"] += reused
        dataset.latent_store = store
        handle.cache_summary = f"latent cache ({handle.cache_mode}): {encoded} images encoded, {reused} reused"
    return stats
