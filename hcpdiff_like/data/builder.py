"""Build the training data from the `data` config section.

    data:
      dataset1:                # several datasets allowed; each yields one batch per training step
        batch_size: 4
        loss_weight: 1.0       # multiplies this dataset's loss (prior preservation: the class dataset)
        resolution: 512        # int or [width, height]
        sources:               # several sources, each an instantiable node with its own repeat
          source1: {_target_: hcpdiff_like.data.sources.ImageCaptionSource, img_dir: ..., repeat: 1}

`build_datasets` checks every source before any model loads and returns one `DatasetHandle` each.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .dataset import FixedSizeDataset, collate


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

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])

    def forever(self) -> Iterator[dict]:
        """Cycle the loader epoch after epoch (order fixed by seed + epoch), starting at the saved position."""
        from accelerate.data_loader import skip_first_batches

        while True:
            sampler = self.loader.sampler
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)
            loader = skip_first_batches(self.loader, self.batch_in_epoch) if self.batch_in_epoch else self.loader
            for batch in loader:
                self.batch_in_epoch += 1
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0


def build_datasets(data_cfg: DictConfig, seed: int = 0, num_processes: int = 1, process_index: int = 0,
                   workers: int = 0) -> list[DatasetHandle]:
    if data_cfg is None or len(data_cfg) == 0:
        raise DataConfigError("config key 'data' defines no dataset")
    handles = []
    for name, ds_cfg in data_cfg.items():
        sources_cfg = ds_cfg.get("sources")
        if not sources_cfg:
            raise DataConfigError(f"data.{name}.sources is empty")
        records = []
        for source_name, source_cfg in sources_cfg.items():
            source = instantiate(source_cfg)
            found = source.records()
            if not found:
                raise DataConfigError(f"data.{name}.sources.{source_name}: no images found in "
                                      f"{getattr(source, 'img_dir', source_cfg)}")
            records.extend(found)
        dataset = FixedSizeDataset(records, resolution=OmegaConf.to_object(ds_cfg.get("resolution", 512))
                                   if isinstance(ds_cfg.get("resolution", 512), DictConfig) else
                                   (list(ds_cfg.resolution) if OmegaConf.is_list(ds_cfg.get("resolution"))
                                    else ds_cfg.get("resolution", 512)),
                                   flip=ds_cfg.get("flip", False), random_crop=ds_cfg.get("random_crop", False),
                                   seed=seed)
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=num_processes, rank=process_index,
                                                      shuffle=True, seed=seed, drop_last=False)
        batch_size = int(ds_cfg.get("batch_size", 1))
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                                             num_workers=workers, drop_last=len(dataset) >= batch_size * num_processes)
        handles.append(DatasetHandle(name, dataset, loader, float(ds_cfg.get("loss_weight", 1.0)), batch_size))
    return handles
