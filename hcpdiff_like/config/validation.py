"""Start-up checks: unknown keys (typos) and missing required values, before any model loads.

Top-level keys are free (experiment files define their own variables such as `character_name`);
the sections below have a fixed set of keys, so `train.trian_steps` in a YAML file is caught here
(Hydra already rejects unknown keys given on the command line).
"""
from __future__ import annotations

import difflib

from omegaconf import DictConfig, OmegaConf

KNOWN_KEYS: dict[str, set[str]] = {
    "train": {"train_steps", "train_epochs", "save_step", "save_every_n_epochs", "lr", "text_encoder_lr", "emb_lr",
              "gradient_accumulation_steps", "max_grad_norm", "scale_lr", "workers", "save_state", "resume", "keep_last_n", "on_nonfinite",
              "ema"},
    "model": {"pretrained_model_name_or_path", "family", "revision", "clip_skip", "clip_final_norm",
              "tokenizer_repeats", "gradient_checkpointing", "vae_dtype", "single_file_config", "attention",
              "full_bf16", "cache_text_embeddings", "channels_last", "compile", "weighted_captions"},
    "objective": {"prediction_type", "loss_type", "huber_c", "min_snr_gamma", "noise_offset",
                  "adaptive_noise_scale", "pyramid_noise_iterations", "pyramid_noise_discount",
                  "zero_terminal_snr", "timestep_sampling", "logit_mean", "logit_std", "min_timestep",
                  "max_timestep", "noise_offset_random_strength", "ip_noise_gamma", "ip_noise_gamma_random_strength",
                  "debiased_estimation", "scale_v_pred_loss_like_noise_pred", "huber_schedule", "huber_scale"},
    "plugin": {"rank", "alpha", "dropout", "type", "lora_unet", "lora_text_encoder", "finetune_unet",
               "finetune_text_encoder"},
    "embeddings": {"emb_dir", "train"},
    "validation": {"every_n_steps", "timesteps", "seed", "batch_size", "resolution", "max_batches", "at_start",
                   "keep_best", "early_stop_patience", "min_delta", "plot", "sources"},
    "sample": {"every_n_steps", "at_start", "prompts", "neg_prompt", "width", "height", "seed", "guidance_scale",
               "num_inference_steps", "sampler"},
}

# data.<dataset>.<key> (docs/data.md); source keys are checked by each source's constructor (data/builder.py)
DATASET_KEYS = {"batch_size", "loss_weight", "resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                "bucket_reso_steps", "bucket_no_upscale", "flip", "random_crop", "cache_latents",
                "latent_cache_dir", "validation_split", "validation_seed", "max_image_pixels", "sources"}

TOP_LEVEL_REQUIRED = ("train", "model", "data", "optimizer", "scheduler")


class ConfigError(ValueError):
    """A config problem; the message names the key."""


def _suggest(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _missing_keys(node, prefix: str = "") -> list[str]:
    """Keys left as `???`, found without resolving interpolations (OmegaConf.missing_keys raises on a
    `${dataset_dir}` that points at a `???` instead of naming `dataset_dir`)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    found = []
    for key, value in items:
        path = f"{prefix}.{key}" if prefix else str(key)
        found += [path] if value == "???" else _missing_keys(value, path)
    return found


def validate_config(cfg: DictConfig) -> None:
    for section in TOP_LEVEL_REQUIRED:
        if cfg.get(section) is None:
            raise ConfigError(f"config section '{section}' is missing")
    missing = sorted(_missing_keys(OmegaConf.to_container(cfg, resolve=False)))
    if missing:
        raise ConfigError("required config value(s) not set: " + ", ".join(missing)
                          + " (set them in your config or on the command line, e.g. "
                          + f"{missing[0]}=...)")
    for section, known in KNOWN_KEYS.items():
        node = cfg.get(section)
        if node is None:
            continue
        for key in node.keys():
            if key not in known:
                raise ConfigError(f"unknown config key '{section}.{key}'{_suggest(key, known)}")
    for name, dataset in (cfg.get("data") or {}).items():
        for key in dataset.keys() if isinstance(dataset, DictConfig) else ():
            if key not in DATASET_KEYS:
                raise ConfigError(f"unknown config key 'data.{name}.{key}'{_suggest(key, DATASET_KEYS)}")
