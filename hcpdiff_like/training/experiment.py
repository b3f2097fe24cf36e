"""The experiment dir, the unit of record: cfg.yaml, ckpts/, tblog/, train.log.

Every process agrees on the path (the launch time is shared at start-up); only the main process
creates files in it.
"""
from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .checkpoints import atomic_write


class ExperimentDir:
    def __init__(self, path: str | Path, is_main: bool = True):
        self.path = Path(path)
        self.is_main = is_main
        self.ckpt_dir = self.path / "ckpts"
        if is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)

    def write_config(self, cfg: DictConfig) -> None:
        """`cfg.yaml`: the fully resolved config, enough to reproduce the run."""
        if not self.is_main:
            return
        text = OmegaConf.to_yaml(cfg, resolve=True)
        atomic_write(self.path / "cfg.yaml", lambda temp: Path(temp).write_text(text, encoding="utf-8"))

    def build_loggers(self, logger_cfg: DictConfig | None) -> list:
        if not self.is_main or not logger_cfg:
            return []
        return [instantiate(node)(exp_dir=str(self.path)) for node in logger_cfg.values() if node is not None]
