"""Validation loss on held-out images, at fixed timesteps with fixed noise, so its curve shows over-fitting.

Config (top-level `validation:` section, defaults in cfgs/base.yaml; docs/presets.md explains it):

    validation:
      every_n_steps: 100           # 0 = off; runs only if there are validation images
      timesteps: [100, 300, 500, 700, 900]
      seed: 555                    # the noise generator's seed (independent of the training RNG)
      sources: {}                  # extra held-out sources, like data.<ds>.sources
    data.<ds>.validation_split: 0.1   # or hold out part of a training dataset (the data pipeline does it)

Every `every_n_steps` optimizer steps (and before the first and after the last step) each validation image
is noised at every fixed timestep with noise from a CPU generator seeded with `seed` (drawn batch by batch,
timestep by timestep), and the mean loss of the model's prediction against the objective's target is
logged (`val_loss`, `val_loss/<set>`), appended to `<exp_dir>/validation.csv` and drawn in
`<exp_dir>/validation.png`. The whole evaluation runs inside a saved-and-restored RNG state and in eval
mode, so a run with validation has exactly the training weights of a run without it. With several
processes each evaluates every n-th batch (the same noise as one process would use) and the sums are added up.
Optional: `keep_best` writes the best weights to `ckpts/best/`, `early_stop_patience` stops training
after that many validations without an improvement of more than `min_delta`.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from ..config.validation import ConfigError
from ..models.conditioning import sdxl_size_info
from .checkpoints import atomic_write
from .objective import latent_loss_mask

CSV_NAME = "validation.csv"
PLOT_NAME = "validation.png"
BEST_DIR = "best"


class ValidationConfigError(ConfigError):
    """A problem in the `validation:` section or a dataset's `validation_split`; names the key."""


@dataclass
class ValidationSet:
    """Held-out records and how to turn them into batches (same resize/crop as training, no random aug)."""

    name: str
    records: list
    resolution: object
    batch_size: int
    handle: object = None           # the training dataset the records were split from, if any

    def loader(self):
        """The data pipeline's deterministic batches (training resize/crop and buckets, masks, no random ops)."""
        if self.handle is not None:
            return self.handle.eval_loader(batch_size=self.batch_size, records=self.records)
        from ..data.dataset import make_eval_loader

        return make_eval_loader(self.records, self.resolution, self.batch_size)


@contextlib.contextmanager
def preserved_rng_state():
    """Run a block without touching the torch (CPU and CUDA), NumPy or Python random streams."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() \
        else []
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Every submodule in eval mode (no dropout) inside; each one's own mode restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for submodule, training in modes:
            submodule.training = training


def _resolution_of(ds_cfg) -> object:
    resolution = ds_cfg.get("resolution", 512) if ds_cfg is not None else 512
    return list(resolution) if OmegaConf.is_list(resolution) else resolution


def build_validation_sets(val_cfg, data_cfg, datasets) -> list[ValidationSet]:
    """Split-off records of each training dataset plus every `validation.sources` entry, checked up front."""
    from hydra.utils import instantiate

    batch_size = int(val_cfg.get("batch_size") or 4)
    sets = []
    for handle in datasets:
        ds_cfg = data_cfg.get(handle.name) if data_cfg is not None else None
        records = list(getattr(handle, "validation_records", None) or [])  # data.<ds>.validation_split
        if records:
            sets.append(ValidationSet(handle.name, records, _resolution_of(ds_cfg), batch_size, handle))
    default_resolution = val_cfg.get("resolution") or (
        _resolution_of(next(iter(data_cfg.values()))) if data_cfg else 512)
    if OmegaConf.is_list(default_resolution):
        default_resolution = list(default_resolution)
    for source_name, source_cfg in (val_cfg.get("sources") or {}).items():
        if source_cfg is None:
            continue
        source = instantiate(source_cfg)
        records = source.records()
        if not records:
            raise ValidationConfigError(f"validation.sources.{source_name}: no images found in "
                                        f"{getattr(source, 'img_dir', source_cfg)}")
        sets.append(ValidationSet(str(source_name), list(records), default_resolution, batch_size))
    return sets


class ValidationLoop:
    """Deterministic validation loss every N steps, with CSV, plot, loggers, best checkpoint and early stop."""

    def __init__(self, val_cfg: Optional[DictConfig], data_cfg: Optional[DictConfig], datasets: list,
                 exp_dir: str | Path, is_main: bool = True, train_steps: Optional[int] = None):
        val_cfg = val_cfg if val_cfg is not None else OmegaConf.create({})
        self.every = int(val_cfg.get("every_n_steps") or 0)
        self.at_start = bool(val_cfg.get("at_start", True))
        self.timesteps = [int(t) for t in (val_cfg.get("timesteps") or [100, 300, 500, 700, 900])]
        self.seed = int(val_cfg.get("seed", 555))
        self.max_batches = val_cfg.get("max_batches")
        self.keep_best = bool(val_cfg.get("keep_best", False))
        self.patience = val_cfg.get("early_stop_patience")
        self.min_delta = float(val_cfg.get("min_delta") or 0.0)
        self.plot = bool(val_cfg.get("plot", True))
        if self.every < 0:
            raise ValidationConfigError(f"validation.every_n_steps={self.every}: expected 0 (off) or a step count")
        if self.patience is not None and int(self.patience) < 1:
            raise ValidationConfigError(f"validation.early_stop_patience={self.patience}: expected null or >= 1")
        self.sets = build_validation_sets(val_cfg, data_cfg, datasets) if self.every else []
        self.exp_dir, self.is_main, self.train_steps = Path(exp_dir), is_main, train_steps
        self.history: list[dict] = []           # {"step": int, "val_loss": float, "<set>": float, ...}
        self.best_loss, self.best_step, self.bad_validations = math.inf, None, 0
        self.should_stop = False
        self._cached_batches: dict[str, list[dict]] = {}
        self._counts: dict[str, int] = {}         # images (x timesteps) behind each set's last loss
        self.shard: Optional[tuple[int, int]] = None  # (processes, this one); None: the accelerator's

    @property
    def enabled(self) -> bool:
        return self.every > 0 and bool(self.sets)

    def describe(self) -> str:
        if not self.enabled:
            return "validation: off"
        counts = ", ".join(f"{s.name} ({len(s.records)} images)" for s in self.sets)
        return f"validation every {self.every} steps on {counts} at timesteps {self.timesteps}, seed {self.seed}"

    # ------------------------------------------------------------------------------------------
    def is_due(self, step: int) -> bool:
        if not self.enabled or any(row["step"] == step for row in self.history):
            return False
        if step == 0:
            return self.at_start
        return step % self.every == 0 or (self.train_steps is not None and step >= self.train_steps)

    def maybe_validate(self, step: int, trainer) -> Optional[float]:
        """Validate if `step` is due; returns the loss (or None). Sets `should_stop` for early stopping."""
        if not self.is_due(step):
            return None
        losses = self.evaluate(trainer)
        improved = self.record(step, losses)
        overall = self.history[-1]["val_loss"]
        per_set = {f"val_loss/{name}": value for name, value in losses.items()} if len(losses) > 1 else {}
        trainer.loggers.scalars({"val_loss": overall, **per_set}, step, force=True)
        if self.is_main:
            self.write_csv()
            if self.plot:
                self.write_plot()
            if improved and self.keep_best:
                self.save_best(step, trainer)
        if self.should_stop:
            trainer.loggers.info(f"early stop at step {step}: no validation improvement for {self.patience} "
                                 f"validations (best {self.best_loss:.6g} at step {self.best_step})")
        self.should_stop = self._agree_across_processes(trainer, self.should_stop)
        return overall

    def _agree_across_processes(self, trainer, flag: bool) -> bool:
        accelerator = getattr(trainer, "accelerator", None)
        if accelerator is None or accelerator.num_processes == 1:
            return flag
        from accelerate.utils import broadcast_object_list

        return bool(broadcast_object_list([flag], from_process=0)[0])

    def record(self, step: int, losses: dict[str, float]) -> bool:
        """Add one validation result; update best / patience. Returns True if it is a new best."""
        weights = {name: self._counts.get(name, 1) for name in losses}
        overall = sum(losses[n] * weights[n] for n in losses) / max(sum(weights.values()), 1)
        self.history.append({"step": int(step), "val_loss": overall, **losses})
        if overall < self.best_loss - self.min_delta:
            self.best_loss, self.best_step, self.bad_validations = overall, int(step), 0
            return True
        self.bad_validations += 1
        if self.patience is not None and self.bad_validations >= int(self.patience):
            self.should_stop = True
        return False

    # ------------------------------------------------------------------------------------------
    def _shard(self, trainer) -> tuple[int, int]:
        if self.shard is not None:
            return self.shard
        accelerator = trainer.accelerator
        return accelerator.num_processes, accelerator.process_index

    def _batches(self, vset: ValidationSet, trainer) -> list[dict]:
        """Latents (the VAE mean, deterministic) and conditioning of a set, encoded once and kept on the CPU.
        With several processes each encodes and evaluates every n-th batch; of the others it keeps the
        latent shape, so that all draw the same noise sequence."""
        if vset.name in self._cached_batches:
            return self._cached_batches[vset.name]
        vae, device = trainer.bundle.vae, trainer.accelerator.device
        processes, rank = self._shard(trainer)
        downsampling = 2 ** (len(vae.config.block_out_channels) - 1)
        cached = []
        for index, batch in enumerate(vset.loader()):
            if self.max_batches is not None and index >= int(self.max_batches):
                break
            if index % processes != rank:  # another process's batch
                pixels = batch.get("pixel_values")
                shape = (tuple(batch["latents"].shape) if "latents" in batch else
                         (pixels.shape[0], vae.config.latent_channels, pixels.shape[2] // downsampling,
                          pixels.shape[3] // downsampling))
                cached.append({"shape": shape})
                continue
            if "latents" in batch:
                latents = batch["latents"].float()
            else:
                pixels = batch["pixel_values"].to(device, dtype=vae.dtype)
                latents = (vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor).float().cpu()
            entry = {"shape": tuple(latents.shape), "latents": latents, "captions": list(batch["captions"]),
                     "size_info": None, "mask": None}
            if trainer.bundle.family == "sdxl":
                entry["size_info"] = sdxl_size_info(batch["original_size"], batch["crop_top_left"],
                                                    batch["target_size"])
            if batch.get("loss_mask") is not None:
                entry["mask"] = latent_loss_mask(batch["loss_mask"], latents.shape[-2:])
            cached.append(entry)
        self._cached_batches[vset.name] = cached
        return cached

    @torch.no_grad()
    def evaluate(self, trainer) -> dict[str, float]:
        """Mean loss per validation set at the fixed timesteps with fixed noise; training RNG untouched."""
        accelerator, objective = trainer.accelerator, trainer.objective
        steps_total = objective.noise_scheduler.config.num_train_timesteps
        bad = [t for t in self.timesteps if not 0 <= t < steps_total]
        if bad:
            raise ValidationConfigError(f"validation.timesteps {bad} outside [0, {steps_total})")
        model = accelerator.unwrap_model(trainer.model)
        device = accelerator.device
        results = {}
        with preserved_rng_state(), eval_mode(model):
            generator = torch.Generator(device="cpu").manual_seed(self.seed)
            for vset in self.sets:
                loss_sum, count = 0.0, 0
                for entry in self._batches(vset, trainer):
                    if "latents" not in entry:  # another process's batch: only keep the noise sequence in step
                        for _ in self.timesteps:
                            torch.randn(entry["shape"], generator=generator)
                        continue
                    latents = entry["latents"].to(device)
                    size_info = entry["size_info"].to(device) if entry["size_info"] is not None else None
                    for t in self.timesteps:
                        noise = torch.randn(latents.shape, generator=generator).to(device)
                        timesteps = torch.full((latents.shape[0],), t, dtype=torch.long, device=device)
                        noisy = objective.add_noise(latents, noise, timesteps)  # plain N(0, 1) noise
                        with accelerator.autocast():
                            prediction = model(noisy, timesteps, entry["captions"], size_info)
                        target = objective.target(latents, noise, timesteps)
                        error = F.mse_loss(prediction.float(), target.float(), reduction="none")
                        loss_sum += float(self._per_sample(error, entry["mask"]).sum())
                        count += latents.shape[0]
                if accelerator.num_processes > 1:  # every process's share of the set
                    sums = torch.tensor([loss_sum, float(count)], dtype=torch.float64, device=device)
                    sums = accelerator.reduce(sums, reduction="sum")
                    loss_sum, count = float(sums[0]), int(round(float(sums[1])))
                results[vset.name] = loss_sum / max(count, 1)
                self._counts[vset.name] = count
        return results

    @staticmethod
    def _per_sample(error: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if mask is None:
            return error.mean(dim=(1, 2, 3))
        mask = mask.to(error.device).expand_as(error)
        return (error * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp_min(1e-8)

    # ------------------------------------------------------------------------------------------
    def write_csv(self) -> Path:
        columns = ["step", "val_loss"] + [s.name for s in self.sets]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.history:
            writer.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()})
        text = buffer.getvalue()
        return atomic_write(self.exp_dir / CSV_NAME, lambda temp: Path(temp).write_text(text, encoding="utf-8"))

    def write_plot(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        steps = [row["step"] for row in self.history]
        if len(self.sets) > 1:
            for vset in self.sets:
                axes.plot(steps, [row.get(vset.name, math.nan) for row in self.history], marker=".",
                          linewidth=1, alpha=0.6, label=vset.name)
        axes.plot(steps, [row["val_loss"] for row in self.history], marker="o", color="black", label="val_loss")
        if self.best_step is not None:
            axes.axvline(self.best_step, color="tab:green", linestyle="--", label=f"best (step {self.best_step})")
        axes.set_xlabel("step")
        axes.set_ylabel("validation loss (fixed timesteps and noise)")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        path = atomic_write(self.exp_dir / PLOT_NAME, lambda temp: figure.savefig(temp, format="png"))
        plt.close(figure)
        return path

    def save_best(self, step: int, trainer) -> Path:
        """Best step's weights as ckpts/best/<target>-<step>.safetensors (+ <word>-<step>.pt); older best removed."""
        best_dir = trainer.exp.ckpt_dir / BEST_DIR
        best_dir.mkdir(parents=True, exist_ok=True)
        written = trainer.write_trained_files(best_dir, step,
                                              extra_metadata={"hcpdiff_like.val_loss": repr(self.best_loss)})
        summary = json.dumps({"step": int(step), "val_loss": self.best_loss,
                              "files": [p.name for p in written]}, indent=2)
        atomic_write(best_dir / "best.json", lambda temp: Path(temp).write_text(summary, encoding="utf-8"))
        keep = {p.name for p in written} | {"best.json"}
        for old in best_dir.iterdir():
            if old.name not in keep and old.is_file():
                old.unlink()
        trainer.loggers.info(f"new best validation loss {self.best_loss:.6g} at step {step}: {best_dir}")
        return best_dir

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"history": [dict(row) for row in self.history], "best_loss": self.best_loss,
                "best_step": self.best_step, "bad_validations": self.bad_validations}

    def load_state_dict(self, state: dict) -> None:
        self.history = [dict(row) for row in state.get("history", [])]
        self.best_loss = float(state.get("best_loss", math.inf))
        self.best_step = state.get("best_step")
        self.bad_validations = int(state.get("bad_validations", 0))
