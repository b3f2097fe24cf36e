"""Command-line entry shared by `hcpdiff_like.train` and the other Hydra programs.

`cfg=<name>` picks a shipped experiment config from `cfgs/train/` (a Hydra group whose files are
`# @package _global_`); `cfg=<path.yaml>` picks the user's own file anywhere on disk. For the path
form we build a small overlay config tree in which the user's folder shadows the shipped `train/`
group, so a user's copy of `lora_anime_character.yaml` wins over the shipped file of that name while
every shipped group (`override /model: ...`) stays reachable.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

from .resolvers import register_resolvers, share_launch_time

CFG_PACKAGE = "hcpdiff_like.cfgs"


def shipped_cfg_dir() -> Path:
    """Folder of the shipped configs: `cfgs/` beside the package in a source checkout, else the
    `hcpdiff_like.cfgs` package data of an installed wheel."""
    checkout = Path(__file__).resolve().parents[2] / "cfgs"
    if (checkout / "base.yaml").is_file():
        return checkout
    from importlib.resources import files

    return Path(str(files(CFG_PACKAGE)))


def _is_path_like(value: str, group: str = "train") -> bool:
    """A file path, unless it names a shipped config of the group (`cfg=anime/text2img_anime_lora`)."""
    if value.endswith((".yaml", ".yml")) or value.startswith((".", "~", os.sep)):
        return True
    return os.sep in value and not (shipped_cfg_dir() / group / f"{value}.yaml").is_file()


def _build_overlay(user_file: Path, group: str = "train") -> Path:
    """A config tree = shipped configs + the user's folder merged into `<group>/` (user wins)."""
    digest = hashlib.sha1(f"{user_file}-{os.getpid()}".encode()).hexdigest()[:10]
    overlay = Path(tempfile.gettempdir()) / f"hcpdiff_like-cfg-{digest}"
    if overlay.exists():
        shutil.rmtree(overlay)
    shutil.copytree(shipped_cfg_dir(), overlay, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    for sibling in user_file.parent.iterdir():
        if sibling.suffix in (".yaml", ".yml") and sibling.is_file():
            shutil.copyfile(sibling, overlay / group / (sibling.stem + ".yaml"))
    return overlay


def translate_argv(argv: list[str], group: str = "train") -> tuple[list[str], Optional[Path]]:
    """Rewrite `cfg=X` into Hydra's `<group>=X` (train; the visualizer: infer); return the new argv
    and an overlay dir if X is a path."""
    new_argv, overlay = [], None
    for arg in argv:
        if arg.startswith("cfg="):
            value = arg[len("cfg="):]
            if _is_path_like(value, group):
                user_file = Path(os.path.expanduser(value)).resolve()
                if user_file.suffix not in (".yaml", ".yml"):
                    user_file = user_file.with_suffix(".yaml")
                if not user_file.is_file():
                    raise SystemExit(f"cfg={value}: config file {user_file} does not exist")
                overlay = _build_overlay(user_file, group)
                value = user_file.stem
            elif not (shipped_cfg_dir() / group / f"{value}.yaml").exists():
                names = sorted(p.relative_to(shipped_cfg_dir() / group).with_suffix("").as_posix()
                               for p in (shipped_cfg_dir() / group).rglob("*.yaml"))
                raise SystemExit(f"cfg={value}: no shipped experiment config of that name in cfgs/{group}/. "
                                 f"Shipped: {', '.join(names)}; or pass a path to your own .yaml")
            arg = f"{group}={value}"
        new_argv.append(arg)
    return new_argv, overlay


_FLAGS_WITH_VALUE = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--cfg", "-c",
                     "--package", "-p", "--experimental-rerun"}


def _split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """Hydra's parser wants its flags (-m, --cfg job, ...) before the overrides."""
    flags, overrides, index = [], [], 0
    while index < len(args):
        arg = args[index]
        if arg.startswith("-"):
            flags.append(arg)
            if arg in _FLAGS_WITH_VALUE and index + 1 < len(args):
                flags.append(args[index + 1])
                index += 1
        else:
            overrides.append(arg)
        index += 1
    return flags, overrides


def run_hydra(task: Callable, config_name: str = "base", argv: Optional[list[str]] = None,
              cfg_group: str = "train") -> None:
    """Run `task(cfg)` under Hydra (single run or `-m` multirun) with our `cfg=` handling;
    `cfg=` picks from the config group `cfg_group` (train; the visualizer uses infer)."""
    import hydra

    register_resolvers()
    share_launch_time()
    args = list(sys.argv[1:] if argv is None else argv)
    args, overlay = translate_argv(args, cfg_group)
    config_path = str(overlay or shipped_cfg_dir())
    flags, overrides = _split_flags(args)
    if not any(a.startswith("hydra/job_logging=") for a in overrides):
        overrides = ["hydra/job_logging=none", "hydra/hydra_logging=none"] + overrides
    sys.argv = [sys.argv[0]] + flags + overrides
    main = hydra.main(config_path=config_path, config_name=config_name, version_base=None)(task)
    try:
        main()
    finally:
        if overlay is not None:
            shutil.rmtree(overlay, ignore_errors=True)


def compose_config(overrides: Optional[list[str]] = None, config_name: str = "base", cfg_group: str = "train"):
    """Compose a config exactly as the entry point would, without running a job (tests, tools).

    `cfg=` is translated like on the command line; the `hydra` node is available for interpolation.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    overrides, overlay = translate_argv(list(overrides or []), cfg_group)
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(overlay or shipped_cfg_dir()), version_base=None):
            return compose(config_name=config_name, overrides=overrides, return_hydra_config=False)
    finally:
        if overlay is not None:
            shutil.rmtree(overlay, ignore_errors=True)
