"""Published architecture configs (no weights) of SD1.5, SD2.1 (768, v-prediction) and SDXL base 1.0.

Each folder is laid out like a diffusers model folder (`unet/config.json`, `vae/config.json`,
`text_encoder[_2]/config.json`, `scheduler/scheduler_config.json`), so diffusers' loaders can read the
architecture of a single-file checkpoint from here, offline. Sources: README.md in this folder.
"""
from __future__ import annotations

from pathlib import Path

PUBLISHED = ("sd15", "sd21", "sdxl")
FAMILY_CONFIG = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}  # model family -> default published config


def published_config_dir(name: str) -> Path:
    """Folder of a shipped config: 'sd15', 'sd21', 'sdxl' (family names sd1/sd2 are accepted too)."""
    key = FAMILY_CONFIG.get(name, name)
    if key not in PUBLISHED:
        raise ValueError(f"no published config named {name!r}; shipped: {', '.join(PUBLISHED)}")
    return Path(__file__).resolve().parent / key
