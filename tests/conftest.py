"""Shared fixtures: tiny models and generated datasets, all offline and on CPU.

The tiny models are written once per test session into a temporary cache (HCPDIFF_LIKE_CACHE),
so every test loads them through the real diffusers-folder loading code.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def hcp_cache(tmp_path_factory):
    """One cache dir for the session: tiny models and the demo dataset are written there once."""
    cache = tmp_path_factory.mktemp("hcp_cache")
    old = os.environ.get("HCPDIFF_LIKE_CACHE")
    os.environ["HCPDIFF_LIKE_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("HCPDIFF_LIKE_CACHE", None)
    else:
        os.environ["HCPDIFF_LIKE_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_sd1(hcp_cache) -> Path:
    from hcpdiff_like.models.tiny import tiny_model_path

    return tiny_model_path("sd1")


@pytest.fixture(scope="session")
def tiny_sd2(hcp_cache) -> Path:
    from hcpdiff_like.models.tiny import tiny_model_path

    return tiny_model_path("sd2")


@pytest.fixture(scope="session")
def tiny_sdxl(hcp_cache) -> Path:
    from hcpdiff_like.models.tiny import tiny_model_path

    return tiny_model_path("sdxl")


@pytest.fixture()
def demo_images(tmp_path) -> Path:
    """8 generated 64x64 PNGs with .txt captions in a fresh folder."""
    from hcpdiff_like.data.demo import make_demo_dataset

    return make_demo_dataset(tmp_path / "images", count=8)


@pytest.fixture()
def run_train(tmp_path):
    """Run the real Hydra entry point in-process: run_train('cfg=demo', 'train.train_steps=4')."""
    from hcpdiff_like.config.launcher import run_hydra
    from hcpdiff_like.train import run_training

    def _run(*overrides: str, exp_root: Path | None = None):
        exp_root = exp_root or tmp_path / "exps"
        results = []

        def task(cfg):
            results.append(run_training(cfg))

        argv = list(overrides) + [f"exp_root={exp_root}"]
        if not any(a.startswith("train.train_steps") for a in argv):
            argv.append("train.train_steps=4")
        saved = list(sys.argv)
        try:
            sys.argv = ["hcpdiff_like.train"]
            run_hydra(task, config_name="base", argv=argv)
        finally:
            sys.argv = saved
            os.environ.pop("HCPDIFF_LIKE_LAUNCH_TIME", None)
        runs = sorted(p for p in Path(exp_root).rglob("cfg.yaml"))
        return results, [p.parent for p in runs]

    return _run
