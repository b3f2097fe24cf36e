"""Sample images during training: every N steps, a grid of the prompt list into `<exp_dir>/samples/`.

Config (top-level `sample:` section of cfgs/base.yaml):

    sample:
      every_n_steps: 100          # 0 = off
      prompts: [...]              # a list (str, or {prompt, neg_prompt, width, height, seed, guidance_scale,
                                  #   num_inference_steps, sampler}) or a file: .txt in kohya's syntax
                                  #   `a photo of sks --n blurry --w 512 --h 768 --d 42 --l 7.5 --s 28 --ss euler_a`
                                  #   (# comments), or .yaml/.json holding such a list

Each grid is `samples/grid-<step>.png` (prompts and seeds in its PNG text) and goes to every logger
(`loggers.image("samples", grid, step)`). Sampling runs on the main process with the live model (LoRA,
trained words) in eval mode, with its own generators; the training RNG state is restored afterwards.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import yaml
from omegaconf import OmegaConf

from ..config.validation import ConfigError
from ..training.checkpoints import atomic_write
from .generate import GenerationSettings, ImageGenerator
from .samplers import SamplerError, canonical_sampler

KOHYA_OPTIONS = {"n": "neg_prompt", "w": "width", "h": "height", "d": "seed", "l": "guidance_scale",
                 "s": "num_inference_steps", "ss": "sampler"}
PROMPT_KEYS = {"prompt", "neg_prompt", "width", "height", "seed", "guidance_scale", "num_inference_steps", "sampler"}


class SamplePromptError(ConfigError):
    """A bad `sample:` section or prompt file; the message names the key, file or line."""


@dataclass
class SamplePrompt:
    prompt: str
    neg_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: int = 0
    guidance_scale: float = 7.0
    num_inference_steps: int = 20
    sampler: str = "ddim"


def parse_kohya_line(line: str, where: str) -> dict:
    """`prompt --n neg --w 512 --h 512 --d 1 --l 7.5 --s 20` -> {prompt, neg_prompt, width, ...}."""
    parts = re.split(r"(?:^|\s+)--(?=[a-z]+(?:\s|$))", line.strip())
    values = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        option, _, value = part.partition(" ")
        if option in KOHYA_OPTIONS:  # others (--g, --cn, ...) are for model types we do not train
            values[KOHYA_OPTIONS[option]] = value.strip()
    try:
        return _typed(values)
    except ValueError as error:
        raise SamplePromptError(f"{where}: {error}") from error


def _typed(values: dict) -> dict:
    out = dict(values)
    for key, kind in (("width", int), ("height", int), ("seed", int), ("num_inference_steps", int),
                      ("guidance_scale", float)):
        if out.get(key) is not None:
            try:
                out[key] = kind(out[key])
            except (TypeError, ValueError):
                raise ValueError(f"{key}={out[key]!r} is not a number") from None
    if out.get("num_inference_steps") is not None:
        out["num_inference_steps"] = min(max(out["num_inference_steps"], 1), 1000)  # as kohya clamps
    return out


def read_prompt_entries(prompts, where: str = "sample.prompts") -> list[dict]:
    """A list in the config, or a .txt (kohya) / .yaml / .json file -> list of prompt dicts."""
    if prompts is None:
        return []
    if isinstance(prompts, (str, os.PathLike)):
        path = Path(os.path.expanduser(str(prompts)))
        if not path.is_file():
            raise SamplePromptError(f"{where}: prompt file {path} does not exist")
        if path.suffix == ".txt":
            return [parse_kohya_line(line, f"{path}:{number}")
                    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                    if line.strip() and not line.lstrip().startswith("#")]
        if path.suffix in (".yaml", ".yml", ".json"):
            loaded = (json.loads if path.suffix == ".json" else yaml.safe_load)(path.read_text(encoding="utf-8"))
            if not isinstance(loaded, list):
                raise SamplePromptError(f"{path}: expected a list of prompts")
            return read_prompt_entries(loaded, str(path))
        raise SamplePromptError(f"{where}: {path} is not a .txt (kohya prompt lines), .yaml or .json file")
    entries = []
    for index, item in enumerate(OmegaConf.to_container(prompts) if OmegaConf.is_config(prompts) else prompts):
        if isinstance(item, str):
            entries.append({"prompt": item})
            continue
        if not isinstance(item, dict) or "prompt" not in item:
            raise SamplePromptError(f"{where}[{index}]: a prompt string or a mapping with a 'prompt' key")
        unknown = set(item) - PROMPT_KEYS
        if unknown:
            raise SamplePromptError(f"{where}[{index}]: unknown key(s) {sorted(unknown)}; known: {sorted(PROMPT_KEYS)}")
        try:
            entries.append(_typed(item))
        except ValueError as error:
            raise SamplePromptError(f"{where}[{index}]: {error}") from error
    return entries


def _default_size(data_cfg) -> tuple[int, int]:
    """The first dataset's resolution (int or [width, height]), else 512."""
    for dataset in (data_cfg or {}).values():
        resolution = dataset.get("resolution") if hasattr(dataset, "get") else None
        if isinstance(resolution, int):
            return resolution, resolution
        if resolution is not None and len(resolution) == 2:
            return int(resolution[0]), int(resolution[1])
        break
    return 512, 512


def image_grid(images: list, columns: Optional[int] = None):
    """Paste images into a grid of equal cells (cell = the largest image), row by row."""
    from PIL import Image

    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    cell_w, cell_h = max(i.width for i in images), max(i.height for i in images)
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    for index, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((index % columns) * cell_w, (index // columns) * cell_h))
    return grid


class TrainingSampler:
    def __init__(self, prompts: list[SamplePrompt], out_dir: Path, every_n_steps: int = 0, at_start: bool = False,
                 n_repeats: int = 1):
        self.prompts = prompts
        self.out_dir = Path(out_dir)
        self.every_n_steps = int(every_n_steps or 0)
        self.at_start = bool(at_start)
        self.n_repeats = n_repeats

    @classmethod
    def from_config(cls, cfg, exp_dir) -> "TrainingSampler":
        """Built from `cfg.sample`; a bad prompt list fails here, before any model loads."""
        section = cfg.get("sample") or {}
        every = int(section.get("every_n_steps") or 0)
        entries = read_prompt_entries(section.get("prompts")) if every or section.get("at_start") else []
        width, height = _default_size(cfg.get("data"))
        defaults = SamplePrompt(prompt="", neg_prompt=str(section.get("neg_prompt") or ""),
                                width=int(section.get("width") or width), height=int(section.get("height") or height),
                                seed=int(section.get("seed") or 0),
                                guidance_scale=float(section.get("guidance_scale", 7.0)),
                                num_inference_steps=int(section.get("num_inference_steps") or 20),
                                sampler=str(section.get("sampler") or "ddim"))
        prompts = []
        for index, entry in enumerate(entries):
            entry = {k: v for k, v in entry.items() if v is not None}
            entry.setdefault("seed", defaults.seed + index)
            prompt = replace(defaults, **entry)
            try:
                canonical_sampler(prompt.sampler)
            except SamplerError as error:
                raise SamplePromptError(f"sample.prompts[{index}]: {error}") from error
            if prompt.width % 8 or prompt.height % 8:
                raise SamplePromptError(f"sample.prompts[{index}]: width/height {prompt.width}x{prompt.height} "
                                        "must be multiples of 8")
            prompts.append(prompt)
        if (every or section.get("at_start")) and not prompts:
            raise SamplePromptError("sample.every_n_steps is set but sample.prompts is empty")
        model_cfg = cfg.get("model") or {}
        return cls(prompts, Path(exp_dir) / "samples", every, bool(section.get("at_start")),
                   int(model_cfg.get("tokenizer_repeats") or 1))

    @property
    def enabled(self) -> bool:
        return bool(self.prompts) and (self.every_n_steps > 0 or self.at_start)

    def describe(self) -> str:
        if not self.enabled:
            return "sample images: off (sample.every_n_steps: 0)"
        return f"sample images: {len(self.prompts)} prompt(s) every {self.every_n_steps} steps -> {self.out_dir}"

    def due(self, step: int) -> bool:
        if not self.enabled:
            return False
        if step == 0:
            return self.at_start
        return self.every_n_steps > 0 and step % self.every_n_steps == 0

    def maybe_sample(self, step: int, trainer) -> Optional[Path]:
        """Called by the trainer after every optimizer step (and once before the first with step 0)."""
        if not self.due(step):
            return None
        accelerator = trainer.accelerator
        path = self.sample(step, trainer) if accelerator.is_main_process else None
        accelerator.wait_for_everyone()
        return path

    def sample(self, step: int, trainer) -> Path:
        accelerator = trainer.accelerator
        bundle = trainer.bundle
        conditioner = accelerator.unwrap_model(trainer.model).conditioner
        modules = [bundle.unet, bundle.vae, *bundle.text_encoders]
        modes = [m.training for m in modules]
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        images = []
        try:
            for module in modules:
                module.eval()
            with torch.random.fork_rng(devices=devices), accelerator.autocast():
                generator = ImageGenerator(bundle, conditioner, accelerator.device, progress=False)
                for prompt in self.prompts:
                    settings = GenerationSettings(width=prompt.width, height=prompt.height,
                                                  num_inference_steps=prompt.num_inference_steps,
                                                  guidance_scale=prompt.guidance_scale, sampler=prompt.sampler,
                                                  n_repeats=self.n_repeats)
                    images.extend(generator.generate([prompt.prompt], [prompt.neg_prompt], [prompt.seed], settings))
        finally:
            for module, mode in zip(modules, modes):
                module.train(mode)
        grid = image_grid(images)
        path = self.save_grid(grid, step)
        trainer.loggers.image("samples", grid, step)
        return path

    def save_grid(self, grid, step: int) -> Path:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("hcpdiff_like.samples", yaml.safe_dump(
            {"step": step, "prompts": [vars(p) for p in self.prompts]}, sort_keys=False, allow_unicode=True))
        path = self.out_dir / f"grid-{step}.png"
        return atomic_write(path, lambda temp: grid.save(temp, format="PNG", pnginfo=info))
