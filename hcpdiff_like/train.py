"""Train entry point.

    accelerate launch -m hcpdiff_like.train cfg=<name or path.yaml> key=value ...
    accelerate launch -m hcpdiff_like.train -m cfg=demo train.lr=1e-4,2e-4     # Hydra multirun sweep
"""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig


def _user_errors() -> tuple:
    from .config.validation import ConfigError
    from .data.builder import DataConfigError
    from .data.sources import SourceError
    from .models.loading import ModelLoadError
    from .plugins.embedding_files import EmbeddingFormatError
    from .plugins.lora import LoraBlockError
    from .training.resume import ResumeError

    return (ConfigError, DataConfigError, SourceError, ModelLoadError, LoraBlockError, EmbeddingFormatError,
            ResumeError, FileNotFoundError)


def run_training(cfg: DictConfig) -> dict:
    """Validate, then set up and run one training job; returns its loss summary."""
    from hydra.core.hydra_config import HydraConfig

    from .config.validation import validate_config
    from .training.trainer import Trainer

    USER_ERRORS = _user_errors()

    exp_dir = cfg.get("exp_dir")
    if HydraConfig.initialized():
        exp_dir = HydraConfig.get().runtime.output_dir
    try:
        validate_config(cfg)
        if cfg.train.get("resume"):  # before any heavy work
            from .training.resume import find_state

            find_state(cfg.train.resume)
        trainer = Trainer(cfg, exp_dir=exp_dir).setup()
    except USER_ERRORS as error:  # a config/data/model problem: one clear line, no traceback
        if exp_dir and Path(exp_dir).is_dir() and not any(Path(exp_dir).iterdir()):
            Path(exp_dir).rmdir()  # the empty dir Hydra made for this run
        raise SystemExit(f"error: {error}") from error
    from .training.resume import ResumeError
    from .training.signals import NonFiniteLossError
    from .training.sweep import job_record

    try:
        summary = trainer.train()
    except (NonFiniteLossError, ResumeError) as error:  # stopped on purpose: one clear line
        raise SystemExit(f"error: {error}") from error
    finally:
        trainer.cleanup()
    trainer.exp.write_summary(job_record(summary))  # sweeps tabulate these (training/sweep.py)
    if summary.get("interrupted"):  # SIGINT/SIGTERM: state saved; 128 + signal number, like the shell
        raise SystemExit(trainer.stop_signal.exit_code)
    return summary


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from .config.launcher import run_hydra

    run_hydra(run_training, config_name="base")


if __name__ == "__main__":
    main()
