"""The training recipe: setup() -> train() -> save_checkpoint() -> cleanup(), read top to bottom.

    config -> data checked -> model loaded -> plugins attached -> optimizer/scheduler
           -> accelerate.prepare -> loop(train_step) -> checkpoints + logs in the experiment dir
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Optional

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..data.builder import build_datasets
from ..models.conditioning import TextConditioner, sdxl_size_info
from ..models.loading import load_model_bundle
from ..plugins.attach import attach_plugins
from ..plugins.lora import lora_metadata, lora_state_dict
from .checkpoints import BASE_PREFIX, save_safetensors
from .experiment import ExperimentDir
from .loggers import LoggerGroup
from .model_wrapper import DiffusionWrapper
from .objective import DiffusionObjective


class Trainer:
    def __init__(self, cfg: DictConfig, exp_dir: Optional[str] = None):
        self.cfg = cfg
        self.exp_dir_path = exp_dir or cfg.exp_dir
        self.global_step = 0

    # ------------------------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        cfg, train = self.cfg, self.cfg.train
        self.accelerator = Accelerator(gradient_accumulation_steps=train.gradient_accumulation_steps,
                                       mixed_precision=cfg.mixed_precision, cpu=cfg.get("cpu", False),
                                       step_scheduler_with_optimizer=False)
        set_seed(cfg.seed + self.accelerator.process_index)
        self.exp = ExperimentDir(self.exp_dir_path, is_main=self.accelerator.is_main_process)
        self.exp.write_config(cfg)
        self.loggers = LoggerGroup(self.exp.build_loggers(cfg.get("logger")) if self.exp.is_main else [])

        # Data first: a bad dataset stops the run before any model loads.
        self.datasets = build_datasets(cfg.data, seed=cfg.seed, num_processes=self.accelerator.num_processes,
                                       process_index=self.accelerator.process_index, workers=train.workers)

        model = cfg.model
        self.bundle = load_model_bundle(model.pretrained_model_name_or_path, family=model.get("family"),
                                        revision=model.get("revision"))
        self.targets = attach_plugins(self.bundle, cfg.get("plugin"), lr=self._scaled(train.lr),
                                      text_encoder_lr=self._scaled(train.text_encoder_lr))
        self.train_text = any(t.trains for n, t in self.targets.items() if n != "unet")
        if not any(t.trains for t in self.targets.values()):
            raise ValueError("nothing to train: the plugin config selects no LoRA blocks or fine-tune groups")
        if model.get("gradient_checkpointing"):
            self.bundle.unet.enable_gradient_checkpointing()
        conditioner = TextConditioner(self.bundle, clip_skip=model.clip_skip, max_chunks=model.tokenizer_repeats,
                                      clip_final_norm=model.get("clip_final_norm", True))
        self.model = DiffusionWrapper(self.bundle.unet, conditioner, self.train_text)
        self._cast_frozen_weights()
        self.objective = DiffusionObjective(self.bundle.noise_scheduler, **OmegaConf.to_container(cfg.objective))

        param_groups = [g for t in self.targets.values() for g in t.param_groups]
        self.optimizer = instantiate(cfg.optimizer)(param_groups)
        self.lr_scheduler = instantiate(cfg.scheduler, num_training_steps=cfg.scheduler.get("num_training_steps")
                                        or train.train_steps)(self.optimizer)
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.model, self.optimizer, self.lr_scheduler)
        self.bundle.vae.to(self.accelerator.device)
        self._log_setup(param_groups)
        return self

    def _scaled(self, lr: float) -> float:
        """train.scale_lr multiplies the lr by the total batch (sum of batch sizes x processes x accumulation)."""
        if not self.cfg.train.get("scale_lr"):
            return float(lr)
        total = sum(d.batch_size for d in self.datasets) * self.accelerator.num_processes \
            * self.cfg.train.gradient_accumulation_steps
        return float(lr) * total

    def _cast_frozen_weights(self) -> None:
        """Frozen weights may live in the half dtype; trained parameters stay fp32 for the optimizer."""
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.cfg.mixed_precision, torch.float32)
        for module in [self.bundle.unet, *self.bundle.text_encoders]:
            for param in module.parameters():
                if not param.requires_grad:
                    param.data = param.data.to(dtype)
        vae_dtype = self.cfg.model.get("vae_dtype") or "fp32"
        self.bundle.vae.to({"fp16": torch.float16, "bf16": torch.bfloat16}.get(vae_dtype, torch.float32))

    def _log_setup(self, param_groups: list) -> None:
        trainable = sum(p.numel() for g in param_groups for p in g["params"])
        total_batch = sum(d.batch_size for d in self.datasets) * self.accelerator.num_processes \
            * self.cfg.train.gradient_accumulation_steps
        self.loggers.info(f"experiment dir: {self.exp.path}")
        self.loggers.info(f"model: {self.bundle.source} (family {self.bundle.family})")
        self.loggers.info(f"processes: {self.accelerator.num_processes}, total batch per optimizer step: "
                          f"{total_batch}, scale_lr: {bool(self.cfg.train.get('scale_lr'))}")
        for dataset in self.datasets:
            self.loggers.info(f"dataset {dataset.name}: {len(dataset.dataset)} samples (repeats included), "
                              f"batch {dataset.batch_size}, loss weight {dataset.loss_weight}")
        for group in param_groups:
            self.loggers.info(f"param group {group['name']}: lr {group.get('initial_lr', group['lr']):.3g}, "
                              f"{sum(p.numel() for p in group['params'])} parameters")
        self.loggers.info(f"trainable parameters: {trainable}; train steps: {self.cfg.train.train_steps}")

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_latents(self, batch: dict) -> torch.Tensor:
        if "latents" in batch:
            return batch["latents"].to(self.accelerator.device)
        vae = self.bundle.vae
        pixels = batch["pixel_values"].to(self.accelerator.device, dtype=vae.dtype)
        latents = vae.encode(pixels).latent_dist.sample()
        return (latents * vae.config.scaling_factor).float()

    def train_step(self, batches: list[dict]) -> float:
        """One optimizer step's worth of work: every dataset contributes one batch."""
        total = 0.0
        with self.accelerator.accumulate(self.model):
            for handle, batch in zip(self.datasets, batches):
                latents = self.encode_latents(batch)
                noise = self.objective.sample_noise(latents)
                timesteps = self.objective.sample_timesteps(latents.shape[0], latents.device)
                noisy = self.bundle.noise_scheduler.add_noise(latents, noise, timesteps)
                size_info = None
                if self.bundle.family == "sdxl":
                    size_info = sdxl_size_info(batch["original_size"], batch["crop_top_left"], batch["target_size"])
                with self.accelerator.autocast():
                    prediction = self.model(noisy, timesteps, batch["captions"], size_info)
                target = self.objective.target(latents, noise, timesteps)
                per_sample = self.objective.per_sample_loss(prediction, target, timesteps, batch.get("loss_mask"))
                weights = batch["loss_weight"].to(per_sample.device).float()
                loss = (per_sample * weights).mean() * handle.loss_weight
                self.accelerator.backward(loss)
                total += loss.detach().item()
            if self.accelerator.sync_gradients and self.cfg.train.max_grad_norm:
                trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
                self.accelerator.clip_grad_norm_(trainable, self.cfg.train.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return total

    def train(self) -> dict:
        from tqdm.auto import tqdm

        train = self.cfg.train
        streams = [iter(d.forever()) for d in self.datasets]
        progress = tqdm(total=train.train_steps, initial=self.global_step, desc="train", unit="step",
                        disable=not self.accelerator.is_main_process, dynamic_ncols=True)
        losses, smoothed, started = [], None, time.time()
        while self.global_step < train.train_steps:
            loss = self.train_step([next(s) for s in streams])
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss} at step {self.global_step + 1}; last checkpoint "
                                         f"kept in {self.exp.ckpt_dir}")
            self.global_step += 1
            losses.append(loss)
            smoothed = loss if smoothed is None else 0.93 * smoothed + 0.07 * loss
            lr = self.lr_scheduler.get_last_lr()[0]
            progress.set_postfix(loss=f"{smoothed:.4f}", lr=f"{lr:.2e}")
            progress.update(1)
            self.loggers.scalars({"loss": loss, "loss_smoothed": smoothed, "lr": lr}, self.global_step)
            if self.global_step % train.save_step == 0 and self.global_step < train.train_steps:
                self.save_checkpoint(self.global_step)
        progress.close()
        self.save_checkpoint(self.global_step)
        summary = {"final_loss": losses[-1] if losses else float("nan"),
                   "mean_loss": sum(losses) / max(len(losses), 1), "steps": self.global_step,
                   "seconds": time.time() - started}
        self.loggers.info(f"done: {summary}")
        return summary

    # ------------------------------------------------------------------------------------------
    def trained_state(self, target_name: str) -> tuple[dict, dict]:
        target = self.targets[target_name]
        module = target.module
        state = lora_state_dict(module, target.lora_specs) if target.lora_specs else {}
        if target.finetuned:
            params = dict(module.named_parameters())
            state.update({BASE_PREFIX + n: params[n].detach().float().cpu() for n in target.finetuned})
        metadata = {"hcpdiff_like.family": self.bundle.family, "hcpdiff_like.step": str(self.global_step)}
        if target.lora_specs:
            metadata.update(lora_metadata(target.lora_specs, target_name, self.bundle.family))
        return state, metadata

    def save_checkpoint(self, step: int) -> None:
        self.accelerator.wait_for_everyone()
        if self.exp.is_main:
            for name, target in self.targets.items():
                if target.trains:
                    state, metadata = self.trained_state(name)
                    save_safetensors(state, self.exp.ckpt_dir / f"{name}-{step}.safetensors", metadata)
            self.loggers.info(f"saved checkpoints for step {step} in {self.exp.ckpt_dir}")
        self.accelerator.wait_for_everyone()

    def cleanup(self) -> None:
        self.loggers.close()
        self.accelerator.end_training()
