"""Build the training data from the `data` config section (keys: docs/data.md, config.validation.DATASET_KEYS).

    data:
      dataset1:                # several datasets allowed; each yields one batch per training step
        batch_size: 4
        loss_weight: 1.0       # multiplies this dataset's loss (prior preservation: the class dataset)
        resolution: 512        # int or [width, height]; the bucket area when enable_bucket
        enable_bucket: false   # kohya aspect-ratio buckets (min/max_bucket_reso, bucket_reso_steps, no_upscale)
        sources:               # several sources, each an instantiable node with its own repeat and loss weight
          source1: {_target_: hcpdiff_like.data.sources.ImageCaptionSource, img_dir: ..., repeat: 1}

`build_datasets` lists and checks every image before any model loads (one warning names every skipped or
converted file) and returns one `DatasetHandle` each.
"""
from __future__ import annotations

import difflib
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..config.validation import DATASET_KEYS
from .buckets import BucketManager
from .dataset import BucketDataset, collate
from .images import DEFAULT_MAX_PIXELS, ImageInfo, describe_problems, scan_images
from .sampler import BucketBatchSampler
from .stats import dataset_summary
from .sources import ImageRecord, SourceError

logger = logging.getLogger("hcpdiff_like.data")




class DataConfigError(ValueError):
    pass


@dataclass
class DatasetHandle:
    """One dataset's loader plus its position, so a resumed run sees the same batches in the same order."""

    name: str
    dataset: torch.utils.data.Dataset
    loader: torch.utils.data.DataLoader
    loss_weight: float
    batch_size: int
    epoch: int = 0
    batch_in_epoch: int = 0
    validation_records: list = field(default_factory=list)
    buckets: Optional[BucketManager] = None
    sources: list = field(default_factory=list)
    cache_mode: Optional[str] = None          # None | "memory" | "disk" (latent_cache.py)
    cache_dir: Optional[str] = None
    cache_summary: str = ""
    image_problems: list = field(default_factory=list)  # ImageInfo of skipped / converted files (images.py)
    stream_loader: Optional[torch.utils.data.DataLoader] = None  # forever()'s loader: persistent workers

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        self.sampler.set_epoch(self.epoch)  # len(loader) is then this epoch's length (repeats may vary)

    @property
    def sampler(self) -> BucketBatchSampler:
        return self.loader.batch_sampler

    def forever(self) -> Iterator[dict]:
        """Cycle the loader epoch after epoch (plan fixed by seed + epoch), starting at the saved position."""
        while True:
            self.sampler.set_epoch(self.epoch)
            self.sampler.start_batch = self.batch_in_epoch
            for batch in self.stream_loader or self.loader:
                self.batch_in_epoch += 1
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0

    def summary(self) -> str:
        """Sources, counts, repeats and the bucket histogram, for the training log."""
        text = dataset_summary(self)
        return text + (f"\n  {self.cache_summary}" if self.cache_summary else "")

    def eval_loader(self, batch_size: Optional[int] = None, records: Optional[list] = None):
        """Deterministic batches of the held-out records (or `records`) with this dataset's buckets."""
        from .dataset import make_eval_loader

        return make_eval_loader(records if records is not None else self.validation_records,
                                self.buckets.resolution, batch_size or self.batch_size, buckets=self.buckets)


def _resolution(ds_cfg) -> int | list[int]:
    value = ds_cfg.get("resolution", 512)
    return list(value) if OmegaConf.is_list(value) else int(value)


def _instantiate_source(name: str, source_name: str, source_cfg):
    path = f"data.{name}.sources.{source_name}"
    if not isinstance(source_cfg, DictConfig) or "_target_" not in source_cfg:
        raise DataConfigError(f"{path}: a source needs `_target_` (e.g. hcpdiff_like.data.sources.ImageCaptionSource)")
    try:
        return instantiate(source_cfg)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, (SourceError, FileNotFoundError)):
            raise cause from None  # already names the folder or file
        if isinstance(cause, ValueError):
            raise DataConfigError(f"{path}: {cause}") from None
        message = str(cause or error)
        unknown = message.split("unexpected keyword argument")[-1].strip(" '\"") \
            if "unexpected keyword argument" in message else None
        if unknown:
            known = [k for k in ("repeat", "loss_weight", "prompt_template", "word_names", "shuffle_tags",
                                 "keep_tokens", "tag_dropout", "caption_dropout", "tag_separator", "mask_dir",
                                 "name", "is_reg", "img_dir", "caption_ext", "recursive", "parent_dir",
                                 "class_tokens", "metadata_file", "image_dir", "root", "multiply_file",
                                 "class_prompt")]
            close = difflib.get_close_matches(unknown, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise DataConfigError(f"unknown config key '{path}.{unknown}'{hint}") from None
        raise DataConfigError(f"{path}: {message}") from None


def validation_split(records: list[ImageRecord], split: float, seed: int) -> tuple[list, list]:
    """kohya's rule: shuffle the (non-regularisation) images with `seed`, train on the first
    ceil(n * (1 - split)), hold out the rest. Regularisation images are never held out."""
    if not 0.0 <= split < 1.0:
        raise DataConfigError(f"validation_split must be within [0, 1), got {split}")
    if split == 0:
        return records, []
    regular = [r for r in records if not r.is_reg]
    order = list(range(len(regular)))
    random.Random(seed).shuffle(order)
    keep = math.ceil(len(regular) * (1.0 - split))
    train = [regular[i] for i in order[:keep]] + [r for r in records if r.is_reg]
    return train, [regular[i] for i in order[keep:]]


def _cache_mode(value) -> Optional[str]:
    if value in (None, False, "none", "null", "false", "off"):
        return None
    if value is True or value == "memory":
        return "memory"
    if value == "disk":
        return "disk"
    raise DataConfigError(f"cache_latents must be false, memory or disk, got {value!r}")


def build_datasets(data_cfg: DictConfig, seed: int = 0, num_processes: int = 1, process_index: int = 0,
                   workers: int = 0, show_progress: bool = True) -> list[DatasetHandle]:
    if data_cfg is None or len(data_cfg) == 0:
        raise DataConfigError("config key 'data' defines no dataset")
    planned = []
    for name, ds_cfg in data_cfg.items():
        for key in ds_cfg.keys():
            if key not in DATASET_KEYS:
                close = difflib.get_close_matches(str(key), sorted(DATASET_KEYS), n=1)
                raise DataConfigError(f"unknown config key 'data.{name}.{key}'"
                                      + (f" (did you mean '{close[0]}'?)" if close else ""))
        sources_cfg = ds_cfg.get("sources")
        if not sources_cfg:
            raise DataConfigError(f"data.{name}.sources is empty")
        sources = []
        for source_name, source_cfg in sources_cfg.items():
            source = _instantiate_source(name, source_name, source_cfg)
            if "name" not in source_cfg:
                source.name = str(source_name)
            found = source.records()
            if not found:
                raise DataConfigError(f"data.{name}.sources.{source_name}: no images found in "
                                      f"{source.location() or source_cfg}")
            sources.append((source_name, source, found))
        planned.append((name, ds_cfg, sources))

    # One scan of every image of every dataset, one warning for all the problems found.
    max_pixels = {name: int(ds_cfg.get("max_image_pixels") or DEFAULT_MAX_PIXELS) for name, ds_cfg, _ in planned}
    infos = {}
    for name, ds_cfg, sources in planned:
        paths = sorted({r.image_path for _, _, found in sources for r in found} - set(infos))
        infos.update(scan_images(paths, max_pixels[name], progress=show_progress and process_index == 0))
    problems = {}
    for name, _, sources in planned:
        paths = {r.image_path for _, _, found in sources for r in found}
        problems[name] = [infos[p] for p in sorted(paths) if infos[p].problem or infos[p].converted]
        problems[name] += [ImageInfo(p, None, why) for _, source, _ in sources for p, why in source.problems]
    unique = {(str(i.path), i.problem, i.converted): i for found in problems.values() for i in found}
    message = describe_problems(unique.values())
    if message and process_index == 0:  # every process checks the files; one of them tells
        logger.warning(message)

    handles = []
    for name, ds_cfg, sources in planned:
        records = []
        for source_name, source, found in sources:
            usable = [r for r in found if infos[r.image_path].problem is None]
            if not usable:
                raise DataConfigError(f"data.{name}.sources.{source_name}: no usable images in "
                                      f"{source.location()} (all {len(found)} were skipped, see the warning)")
            for record in usable:
                record.size = infos[record.image_path].size
            records.extend(usable)
        split = float(ds_cfg.get("validation_split") or 0.0)
        val_seed = ds_cfg.get("validation_seed")
        records, held_out = validation_split(records, split, seed if val_seed is None else int(val_seed))
        handle = _make_handle(name, ds_cfg, [s for _, s, _ in sources], records, held_out, seed, num_processes,
                              process_index, workers)
        handle.image_problems = problems[name]
        handles.append(handle)
    return handles


def _make_handle(name, ds_cfg, sources, records, held_out, seed, num_processes, process_index, workers):
    try:
        buckets = BucketManager(_resolution(ds_cfg), enabled=bool(ds_cfg.get("enable_bucket", False)),
                                min_size=int(ds_cfg.get("min_bucket_reso", 256)),
                                max_size=int(ds_cfg.get("max_bucket_reso", 1024)),
                                step=int(ds_cfg.get("bucket_reso_steps", 64)),
                                no_upscale=bool(ds_cfg.get("bucket_no_upscale", False)))
        assignments = [buckets.select(*r.size) for r in records]
        for record in held_out:
            record.extras["bucket_assignment"] = buckets.select(*record.size)
    except ValueError as error:
        raise DataConfigError(f"data.{name}: {error}") from None
    cache_mode = _cache_mode(ds_cfg.get("cache_latents", False))
    random_crop = bool(ds_cfg.get("random_crop", False))
    if cache_mode and random_crop:
        logger.warning(f"data.{name}: random_crop cannot be cached; cached latents use the centre crop")
    dataset = BucketDataset(records, assignments, flip=bool(ds_cfg.get("flip", False)),
                            random_crop=random_crop and not cache_mode, seed=seed,
                            max_pixels=int(ds_cfg.get("max_image_pixels") or DEFAULT_MAX_PIXELS))
    bucket_ids = {b: i for i, b in enumerate(sorted({a.bucket for a in assignments}))}
    batch_size = int(ds_cfg.get("batch_size", 1))
    sampler = BucketBatchSampler([bucket_ids[a.bucket] for a in assignments], [r.repeat for r in records],
                                 batch_size, seed=seed, num_processes=num_processes, process_index=process_index)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
    # training streams through its own loader whose workers persist across epochs (no start-up stall each
    # epoch); `loader` stays free for direct iteration. The epoch plan is drawn in the main process for both.
    stream = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                                         persistent_workers=True) if workers > 0 else None
    return DatasetHandle(name, dataset, loader, float(ds_cfg.get("loss_weight", 1.0)), batch_size,
                         validation_records=held_out, buckets=buckets, sources=sources, cache_mode=cache_mode,
                         cache_dir=ds_cfg.get("latent_cache_dir"), stream_loader=stream)
