"""The training recipe: setup() -> train() -> save_checkpoint() -> cleanup(), read top to bottom.

    config -> data checked -> model loaded -> plugins attached -> optimizer/scheduler
           -> accelerate.prepare -> loop(train_step) -> checkpoints + logs in the experiment dir
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ..config.resolvers import cpu_processes
from ..config.validation import ConfigError
from ..data.builder import build_datasets
from ..infer.training_samples import TrainingSampler
from ..infer.weighted_captions import conditioner_class
from ..data.latent_cache import cache_latents
from ..models.conditioning import TextConditioner, sdxl_size_info
from ..models.loading import load_model_bundle
from ..plugins.attach import attach_plugins
from ..plugins.embedding_files import write_embedding
from ..plugins.embeddings import attach_embeddings, load_embedding_dir, trained_word_files
from ..plugins.lora import lora_metadata, lora_state_dict
from .checkpoints import BASE_PREFIX, prune_checkpoints, save_safetensors
from .ema import EMA
from .epochs import steps_from_epochs
from .experiment import ExperimentDir
from .loggers import LoggerGroup, LossMeter, plot_loss_curve
from .model_wrapper import DiffusionWrapper
from .objective import DiffusionObjective
from .resume import open_streams, restore_training_state, save_training_state
from .signals import NonFiniteGuard, StopOnSignal
from .speed import apply_speed_options, apply_tf32, check_speed_options, weight_dtype
from .text_cache import TextEmbeddingCache
from .validation import ValidationLoop


class Trainer:
    def __init__(self, cfg: DictConfig, exp_dir: Optional[str] = None):
        self.cfg = cfg
        self.exp_dir_path = exp_dir or cfg.exp_dir
        self.global_step = 0
        self.loss_meter = LossMeter()  # saved with the training state, so a resumed run reports the whole run
        self.nonfinite = NonFiniteGuard(cfg.train.get("on_nonfinite") or "stop", Path(self.exp_dir_path) / "ckpts")
        self.stop_signal = StopOnSignal()

    # ------------------------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        cfg, train = self.cfg, self.cfg.train
        self.accelerator = Accelerator(gradient_accumulation_steps=train.gradient_accumulation_steps,
                                       mixed_precision=cfg.mixed_precision,
                                       cpu=cfg.get("cpu", False) or cpu_processes(),  # CPU DDP: gloo
                                       step_scheduler_with_optimizer=False)
        set_seed(cfg.seed + self.accelerator.process_index)
        self.exp = ExperimentDir(self.exp_dir_path, is_main=self.accelerator.is_main_process)
        self.exp.write_config(cfg)
        self.loggers = LoggerGroup(self.exp.build_loggers(cfg.get("logger"), self.exp.public_config(cfg))
                                   if self.exp.is_main else [])

        # Data first: a bad dataset stops the run before any model loads.
        self.datasets = build_datasets(cfg.data, seed=cfg.seed, num_processes=self.accelerator.num_processes,
                                       process_index=self.accelerator.process_index, workers=train.workers)
        in_epochs = steps_from_epochs(train, len(self.datasets[0].loader))  # train.train_epochs & co.
        if in_epochs is not None:
            with open_dict(cfg):
                train.train_steps, train.save_step = in_epochs["train_steps"], in_epochs["save_step"]
            self.loggers.info(f"{in_epochs['steps_per_epoch']} optimizer steps per epoch of {self.datasets[0].name}: "
                              f"train_steps {train.train_steps}, save_step {train.save_step}")
        self.validator = ValidationLoop(cfg.get("validation"), cfg.data, self.datasets, self.exp.path,
                                        is_main=self.exp.is_main, train_steps=train.train_steps)
        self.loggers.info(self.validator.describe())
        self.sampler = TrainingSampler.from_config(cfg, self.exp.path)  # sample images (infer/training_samples.py)
        self.loggers.info(self.sampler.describe())

        model = cfg.model
        check_speed_options(model, cfg.mixed_precision)
        apply_tf32(cfg.get("allow_tf32", False))
        self.bundle = load_model_bundle(model.pretrained_model_name_or_path, family=model.get("family"),
                                        revision=model.get("revision"),
                                        single_file_config=model.get("single_file_config"))
        self.targets = attach_plugins(self.bundle, cfg.get("plugin"), lr=self._scaled(train.lr),
                                      text_encoder_lr=self._scaled(train.text_encoder_lr))
        conditioner = conditioner_class(model)(self.bundle, clip_skip=model.clip_skip,  # model.weighted_captions
                                               max_chunks=model.tokenizer_repeats,
                                               clip_final_norm=model.get("clip_final_norm", True))
        self.word_groups = self._attach_embeddings(conditioner)
        self.trained_words = [group["word"] for group in self.word_groups]
        self.train_text = bool(self.word_groups) or any(t.trains for n, t in self.targets.items() if n != "unet")
        if not any(t.trains for t in self.targets.values()) and not self.word_groups:
            raise ConfigError("nothing to train: the plugin config selects no LoRA blocks or fine-tune groups "
                             "and embeddings.train names no word")
        if model.get("gradient_checkpointing"):
            self.bundle.unet.enable_gradient_checkpointing()
        self.loggers.info("unet: " + ", ".join(apply_speed_options(self.bundle.unet, model)))
        self.model = DiffusionWrapper(self.bundle.unet, conditioner, self.train_text)
        if model.get("cache_text_embeddings"):  # only when nothing in the text path trains
            self.model.text_cache = None if self.train_text else TextEmbeddingCache(log=self.loggers.info)
            self.loggers.info(f"cache_text_embeddings: {'on' if self.model.text_cache else 'off (text trains)'}")
        self._cast_frozen_weights()
        cache_latents(self.datasets, self.bundle.vae, self.accelerator.device, accelerator=self.accelerator,
                      show_progress=self.exp.is_main)  # data/latent_cache.py; no-op unless data.<ds>.cache_latents
        for handle in self.datasets:
            self.loggers.info(handle.summary())
        self.objective = DiffusionObjective(self.bundle.noise_scheduler, **OmegaConf.to_container(cfg.objective))
        self.bundle.noise_scheduler = self.objective.noise_scheduler  # zero_terminal_snr rescales it

        # Network parameters and trigger words each get their own optimizer + lr schedule (pivotal tuning).
        param_groups = [g for t in self.targets.values() for g in t.param_groups]
        self.optimizers, self.lr_schedulers = [], []
        for groups, opt_cfg, sched_cfg in ((param_groups, cfg.optimizer, cfg.scheduler),
                                           (self.word_groups, cfg.get("optimizer_emb") or cfg.optimizer,
                                            cfg.get("scheduler_emb") or cfg.scheduler)):
            if groups:
                optimizer = instantiate(opt_cfg)(groups)
                self.optimizers.append(optimizer)
                self.lr_schedulers.append(instantiate(sched_cfg, num_training_steps=sched_cfg.get(
                    "num_training_steps") or train.train_steps)(optimizer))
        prepared = self.accelerator.prepare(self.model, *self.optimizers, *self.lr_schedulers)
        count = len(self.optimizers)
        self.model, self.optimizers = prepared[0], list(prepared[1:1 + count])
        self.lr_schedulers = list(prepared[1 + count:])
        self.bundle.vae.to(self.accelerator.device)
        ema_options = train.get("ema")  # after prepare: the average lives on the training device
        self.ema = EMA([p for g in param_groups + self.word_groups for p in g["params"]],  # words too (pivotal)
                       **OmegaConf.to_container(ema_options)) if ema_options else None
        self._log_setup(param_groups + self.word_groups)
        return self

    def _attach_embeddings(self, conditioner: TextConditioner) -> list[dict]:
        """Load every word in `embeddings.emb_dir`; the words in `embeddings.train` get param groups."""
        emb_cfg = self.cfg.get("embeddings") or {}
        train_words = {str(w["name"]): w.get("lr") for w in (emb_cfg.get("train") or [])}
        emb_dir = emb_cfg.get("emb_dir")
        if not emb_dir or (not train_words and not Path(str(emb_dir)).is_dir()):
            return []
        files = load_embedding_dir(emb_dir)
        return attach_embeddings(self.bundle, conditioner, files, train=train_words,
                                 default_lr=self._scaled(self.cfg.train.emb_lr))

    @property
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for optimizer in self.optimizers for g in optimizer.param_groups for p in g["params"]]

    def _scaled(self, lr: float) -> float:
        """train.scale_lr multiplies the lr by the total batch (sum of batch sizes x processes x accumulation)."""
        if not self.cfg.train.get("scale_lr"):
            return float(lr)
        total = sum(d.batch_size for d in self.datasets) * self.accelerator.num_processes \
            * self.cfg.train.gradient_accumulation_steps
        return float(lr) * total

    def _cast_frozen_weights(self) -> None:
        """Frozen weights may live in the half dtype; trained parameters stay fp32 for the optimizer
        (model.full_bf16: they are bf16 too)."""
        dtype = weight_dtype(self.cfg.mixed_precision)
        full_bf16 = bool(self.cfg.model.get("full_bf16"))
        for module in [self.bundle.unet, *self.bundle.text_encoders]:
            for param in module.parameters():
                if full_bf16 or not param.requires_grad:
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
                          f"{total_batch}, scale_lr: {bool(self.cfg.train.get('scale_lr'))}"
                          + (f" (every lr x {total_batch})" if self.cfg.train.get("scale_lr") else ""))
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

    def train_step(self, batches: list) -> float:
        """One optimizer step. `batches` holds one batch per dataset, or (gradient accumulation) one such
        list per micro-step; gradients of all micro-steps add up before the optimizers step once."""
        micro_steps = batches if batches and isinstance(batches[0], (list, tuple)) else [batches]
        total = 0.0
        for micro_batches in micro_steps:
            with self.accelerator.accumulate(self.model):
                micro_loss = 0.0
                for handle, batch in zip(self.datasets, micro_batches):
                    loss = self.diffusion_loss(batch) * handle.loss_weight  # prior preservation: class data
                    self.accelerator.backward(loss)
                    micro_loss = micro_loss + loss.detach().float()
                total += self.mean_over_processes(micro_loss)
                if self.nonfinite.skip_update(total, self.global_step + 1, self.accelerator):  # on_nonfinite=skip
                    for optimizer in self.optimizers:
                        optimizer.zero_grad(set_to_none=True)
                    for lr_scheduler in self.lr_schedulers:
                        lr_scheduler.step()
                    return float("nan")
                if self.accelerator.sync_gradients:
                    self.optimizer_step()
        return total / len(micro_steps)

    def mean_over_processes(self, loss: torch.Tensor) -> float:
        """The loss averaged over all processes: one all-reduce and one host sync per micro-step."""
        if self.accelerator.num_processes > 1:
            loss = self.accelerator.reduce(loss.reshape(1), reduction="mean")
        return float(loss.item())

    def diffusion_loss(self, batch: dict) -> torch.Tensor:
        """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps;  loss = w(t) * criterion(model(x_t, t, text), target)."""
        objective = self.objective
        latents = self.encode_latents(batch)
        noise = objective.sample_noise(latents)
        timesteps = objective.sample_timesteps(latents.shape[0], latents.device)
        noisy = objective.training_input(latents, noise, timesteps)  # + input perturbation (ip_noise_gamma)
        size_info = None
        if self.bundle.family == "sdxl":  # micro-conditioning on each image's original size and crop
            size_info = sdxl_size_info(batch["original_size"], batch["crop_top_left"], batch["target_size"])
        with self.accelerator.autocast():
            prediction = self.model(noisy, timesteps, batch["captions"], size_info)
        target = objective.target(latents, noise, timesteps)
        per_sample = objective.per_sample_loss(prediction, target, timesteps, batch.get("loss_mask"))
        return (per_sample * batch["loss_weight"].to(per_sample.device).float()).mean()

    def optimizer_step(self) -> None:
        """Clip, step every optimizer and lr schedule, clear the gradients, update the EMA."""
        if self.cfg.train.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.trainable_parameters, self.cfg.train.max_grad_norm)
        for optimizer in self.optimizers:
            optimizer.step()
        for lr_scheduler in self.lr_schedulers:
            lr_scheduler.step()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()

    def train(self) -> dict:
        from tqdm.auto import tqdm

        train = self.cfg.train
        resumed = bool(train.get("resume"))
        resumed_rng = restore_training_state(self, train.resume) if resumed else None
        streams = open_streams(self.datasets, resumed_rng)  # data order and RNG continue where the state left
        self.stop_signal.install()  # SIGINT/SIGTERM: finish the current step, save, stop (training/signals.py)
        progress = tqdm(total=train.train_steps, initial=self.global_step, desc="train", unit="step",
                        disable=not self.accelerator.is_main_process, dynamic_ncols=True)
        meter, started = self.loss_meter, time.time()
        if not resumed:
            self.validator.maybe_validate(self.global_step, self)  # baseline before the first step
            self.sampler.maybe_sample(self.global_step, self)  # sample.at_start
        while self.global_step < train.train_steps:
            loss = self.train_step([[next(s) for s in streams] for _ in range(train.gradient_accumulation_steps)])
            self.global_step += 1
            if math.isfinite(loss):
                meter.update(loss, self.global_step)
            else:  # train.on_nonfinite=skip dropped this update (stop raises inside train_step)
                meter.skipped += 1
                self.loggers.info(f"step {self.global_step}: non-finite loss, update skipped")
            smoothed = meter.smoothed if meter.smoothed is not None else float("nan")
            lrs = [scheduler.get_last_lr()[0] for scheduler in self.lr_schedulers]
            progress.set_postfix(loss=f"{smoothed:.4f}", lr=f"{lrs[0]:.2e}", refresh=False)  # update redraws
            progress.update(1)
            scalars = {"loss": loss, "loss_smoothed": smoothed, "lr": lrs[0]}
            if self.word_groups:  # HCP's LR_model / LR_word
                scalars["lr_word"] = lrs[-1]
            self.loggers.scalars(scalars, self.global_step)
            self.validator.maybe_validate(self.global_step, self)
            self.sampler.maybe_sample(self.global_step, self)  # every sample.every_n_steps
            # per-step hooks go above: the training state saved below must include what they did
            stop = self.stop_signal.should_stop(self.accelerator)
            if stop or (self.global_step % train.save_step == 0 and self.global_step < train.train_steps):
                self.save_checkpoint(self.global_step)
            if stop or self.validator.should_stop:  # a signal / validation.early_stop_patience
                break
        progress.close()
        self.stop_signal.uninstall()
        if self.exp.is_main and meter.history:  # the curve people look at first: <exp_dir>/loss.png
            self.loggers.image("loss_curve", plot_loss_curve(meter.history, self.exp.path / "loss.png"),
                               self.global_step)
        if not self.stop_signal.signal_name:
            self.save_checkpoint(self.global_step)
        summary = {**meter.summary(), "steps": self.global_step, "seconds": time.time() - started,
                   "interrupted": self.stop_signal.signal_name}
        if self.stop_signal.signal_name:
            self.loggers.info(f"stopped by {self.stop_signal.signal_name} after step {self.global_step}; checkpoints "
                              f"and training state saved; continue with train.resume={self.exp.path}")
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

    def write_trained_files(self, folder: Path, step: int, words: bool = True,
                            extra_metadata: Optional[dict] = None) -> list[Path]:
        """What one step trained, into `folder`: `<target>-<step>.safetensors` per trained model and (words)
        `<word>-<step>.pt` per trained word. Main process only; returns the paths written."""
        written = []
        for name, target in self.targets.items():
            if target.trains:
                state, metadata = self.trained_state(name)
                metadata.update(extra_metadata or {})
                written.append(save_safetensors(state, Path(folder) / f"{name}-{step}.safetensors", metadata))
        if words:
            for word_file in trained_word_files(self.bundle, self.trained_words, step):
                written.append(write_embedding(word_file, Path(folder) / f"{word_file.name}-{step}.pt"))
        return written

    def save_checkpoint(self, step: int) -> None:
        self.accelerator.wait_for_everyone()
        if self.exp.is_main:
            self.write_trained_files(self.exp.ckpt_dir, step)
            if self.ema is not None:  # same keys and metadata, averaged weights (docs/training.md)
                with self.ema.applied():  # write inside: the state's tensors share the weights' memory
                    self.write_trained_files(self.exp.ckpt_dir / "ema", step)
            self.loggers.info(f"saved checkpoints for step {step} in {self.exp.ckpt_dir}")
        if self.cfg.train.get("save_state") or self.stop_signal.signal_name:  # collective: every process
            save_training_state(self, step)
        if self.exp.is_main:
            prune_checkpoints(self.exp.ckpt_dir, self.cfg.train.get("keep_last_n"))
        self.accelerator.wait_for_everyone()

    def cleanup(self) -> None:
        self.stop_signal.uninstall()  # also after an error inside train()
        self.loggers.close()
        self.accelerator.end_training()
