"""The experiment dir, the unit of record: cfg.yaml, ckpts/, tblog/, train.log, summary.json.

Every process agrees on the path (the launch time is shared at start-up); only the main process
creates files in it. A resumed run (`train.resume`) continues in the same dir and keeps the original
cfg.yaml; its own config goes to `cfg-resume-<time>.yaml`. Secrets from the environment (API keys,
tokens) are replaced by `***` in everything written from the config.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .checkpoints import atomic_write

_SECRET_NAME = re.compile(r"(API_?KEY|TOKEN|SECRET|PASSWORD)", re.IGNORECASE)
REDACTED = "***"


def secret_values() -> list[str]:
    """Values of environment variables that look like credentials (WANDB_API_KEY, HF_TOKEN, ...)."""
    return sorted({value for name, value in os.environ.items() if _SECRET_NAME.search(name) and len(value) >= 8},
                  key=len, reverse=True)


def scrub(value: Any, secrets: list[str]) -> Any:
    """A copy of a plain (container) value with every secret substring replaced by `***`."""
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {scrub(k, secrets): scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v, secrets) for v in value]
    return value


class ExperimentDir:
    def __init__(self, path: str | Path, is_main: bool = True):
        self.path = Path(path)
        self.is_main = is_main
        self.ckpt_dir = self.path / "ckpts"
        if is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)

    def public_config(self, cfg: DictConfig) -> dict:
        """The fully resolved config as plain data, secrets scrubbed."""
        return scrub(OmegaConf.to_container(cfg, resolve=True), secret_values())

    def write_config(self, cfg: DictConfig) -> None:
        """`cfg.yaml`: the fully resolved config, enough to reproduce the run."""
        if not self.is_main:
            return
        text = OmegaConf.to_yaml(OmegaConf.create(self.public_config(cfg)))
        name = "cfg.yaml"
        resuming = (cfg.get("train") or {}).get("resume")
        if resuming and (self.path / name).is_file():
            name = f"cfg-resume-{time.strftime('%Y-%m-%d-%H-%M-%S')}.yaml"
        atomic_write(self.path / name, lambda temp: Path(temp).write_text(text, encoding="utf-8"))

    def write_summary(self, summary: dict) -> None:
        """`summary.json`: the run's outcome (loss numbers, steps, overrides); sweeps tabulate these."""
        if self.is_main:
            text = json.dumps(scrub(summary, secret_values()), indent=1, default=str)
            atomic_write(self.path / "summary.json", lambda temp: Path(temp).write_text(text, encoding="utf-8"))

    def build_loggers(self, logger_cfg: DictConfig | None, run_config: dict | None = None) -> list:
        if not self.is_main or not logger_cfg:
            return []
        loggers = []
        for node in logger_cfg.values():
            if node is None:
                continue
            factory = instantiate(node)
            target = getattr(factory, "func", factory)
            accepts = "run_config" in inspect.signature(target).parameters
            loggers.append(factory(exp_dir=str(self.path), **({"run_config": run_config} if accepts else {})))
        return loggers
