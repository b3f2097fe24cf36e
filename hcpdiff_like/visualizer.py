"""Visualizer entry point: generate images from a base model, optionally with a run's step merged in.

    python -m hcpdiff_like.visualizer cfg=<name in cfgs/infer/ | path.yaml> prompt='...' key=value ...
    python -m hcpdiff_like.visualizer cfg=anime/text2img_anime_lora exp_dir=exps/<ts> model_steps=1000 \\
        prompt='masterpiece, 1girl, {surtr_arknights-1000:1.2}'
    python -m hcpdiff_like.visualizer cfg=output/0001-42-a_cat.yaml            # regenerate from a record

Prompts may contain spaces, commas and brackets without extra quoting: `prompt=` and `neg_prompt=` values
are passed to Hydra as quoted strings.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

CONFIG_NAME = "infer/base"
CFG_GROUP = "infer"
FREE_TEXT_KEYS = ("prompt", "neg_prompt")
INFER_KEYS = {"merge": {"alpha", "part_alpha", "lora"}, "save": {"save_cfg"}}


class VisualizerConfigError(ValueError):
    pass


def quote_free_text(argv: list[str]) -> list[str]:
    """`prompt=a, (b:1.2)` -> `prompt='a, (b:1.2)'` so Hydra's override grammar reads it as one string."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in FREE_TEXT_KEYS and not (len(value) >= 2 and value[0] == value[-1]
                                                                and value[0] in "'\""):
            arg = f"{key}={_hydra_quoted(value)}"
        out.append(arg)
    return out


def _hydra_quoted(value: str) -> str:
    """Hydra's quoted string: escape quotes, and double only backslashes that precede a quote or the end."""
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value) + "'"


def _per_image(value, total: int, bs: int, key: str) -> list[str]:
    """A str for every image, or a list with one entry per image or per batch position."""
    if value is None:
        return [""] * total
    if isinstance(value, str):
        return [value] * total
    values = [str(v) for v in value]
    if len(values) == total:
        return values
    if len(values) == bs:
        return values * (total // bs)
    raise VisualizerConfigError(f"{key}: a list of {len(values)} prompts; give one per image (num x bs = {total}) "
                                f"or one per batch position (bs = {bs})")


def _collapse(values: list[str]):
    return values[0] if len(set(values)) == 1 else values


def check_config(data: dict) -> None:
    """Typos and impossible values, before any model loads."""
    for section, known in INFER_KEYS.items():
        for key in (data.get(section) or {}):
            if key not in known:
                raise VisualizerConfigError(f"unknown config key '{section}.{key}' (known: {', '.join(sorted(known))})")
    for key in ("bs", "num"):
        if not isinstance(data.get(key), int) or data[key] < 1:
            raise VisualizerConfigError(f"{key} must be a positive integer (got {data.get(key)!r})")
    args = data.get("infer_args") or {}
    for key in ("width", "height"):
        if int(args.get(key, 512)) % 8:
            raise VisualizerConfigError(f"infer_args.{key}={args.get(key)} must be a multiple of 8")
    from .infer.samplers import canonical_sampler

    canonical_sampler(str(data.get("sampler")))
    if data.get("pretrained_model") in (None, "") and not data.get("exp_dir"):
        raise VisualizerConfigError("pretrained_model is not set (a local diffusers folder, a single file or "
                                    "tiny:sd1), and there is no exp_dir to take the run's base model from")


def run_base_model(exp_dir: str) -> tuple[str, Optional[str]]:
    """The base model (and family) a run trained on, from its cfg.yaml."""
    cfg_path = Path(os.path.expanduser(exp_dir)) / "cfg.yaml"
    if not cfg_path.is_file():
        raise VisualizerConfigError(f"pretrained_model is null and {cfg_path} does not exist; set pretrained_model")
    model = (OmegaConf.load(cfg_path).get("model") or {})
    if not model.get("pretrained_model_name_or_path"):
        raise VisualizerConfigError(f"{cfg_path} names no model.pretrained_model_name_or_path; set pretrained_model")
    return str(model["pretrained_model_name_or_path"]), model.get("family")


def settings_from(data: dict):
    from .infer.generate import GenerationSettings

    args = dict(data.get("infer_args") or {})
    return GenerationSettings(width=int(args.pop("width", 512)), height=int(args.pop("height", 512)),
                              num_inference_steps=int(args.pop("num_inference_steps", 30)),
                              guidance_scale=float(args.pop("guidance_scale", 7.5)), sampler=str(data["sampler"]),
                              sampler_args=dict(data.get("sampler_args") or {}), n_repeats=int(data["N_repeats"]),
                              extra=args)


def run_visualizer(cfg: DictConfig) -> list[Path]:
    """Generate num x bs images into output_dir; return the PNG paths."""
    from tqdm.auto import tqdm

    from .infer.generate import ImageGenerator, resolve_seeds
    from .infer.model import load_inference_model
    from .infer.records import next_index, save_image_with_record

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise VisualizerConfigError(f"required config value(s) not set: {', '.join(missing)} "
                                    f"(e.g. {missing[0]}=... on the command line)")
    data = OmegaConf.to_container(cfg, resolve=True)
    check_config(data)
    for key in ("emb_dir", "exp_dir", "pretrained_model"):  # records must not depend on the working dir
        if data.get(key) and Path(os.path.expanduser(str(data[key]))).exists():
            data[key] = str(Path(os.path.expanduser(str(data[key]))).resolve())
    bs, num = data["bs"], data["num"]
    total = bs * num
    prompts = _per_image(data.get("prompt"), total, bs, "prompt")
    negatives = _per_image(data.get("neg_prompt"), total, bs, "neg_prompt")
    seeds = resolve_seeds(data.get("seed"), total)
    settings = settings_from(data)
    family = data.get("family")
    if data.get("pretrained_model") in (None, ""):
        data["pretrained_model"], run_family = run_base_model(data["exp_dir"])
        family = family or run_family
        data["family"] = family
    merge = data.get("merge") or {}
    model = load_inference_model(
        data["pretrained_model"], family=family, exp_dir=data.get("exp_dir"), step=data.get("model_steps"),
        merge_alpha=float(merge.get("alpha", 0.85)), part_alpha=float(merge.get("part_alpha", 1.0)),
        extra_lora=merge.get("lora") or [], emb_dir=data.get("emb_dir"), clip_skip=int(data["clip_skip"]),
        clip_final_norm=bool(data["clip_final_norm"]), n_repeats=int(data["N_repeats"]), dtype=str(data["dtype"]),
        device=data.get("device"))
    generator = ImageGenerator(model.bundle, model.conditioner, model.device, progress=num == 1)
    output_dir = Path(os.path.expanduser(str(data["output_dir"])))
    output_dir.mkdir(parents=True, exist_ok=True)
    index = next_index(output_dir)
    shown = {"sampler": settings.sampler, "width": settings.width, "height": settings.height,
             "guidance_scale": settings.guidance_scale, "num_inference_steps": settings.num_inference_steps}
    written = []
    for batch in tqdm(range(num), desc="generate", unit="batch", disable=num == 1):
        part = slice(batch * bs, (batch + 1) * bs)
        images = generator.generate(prompts[part], negatives[part], seeds[part], settings)
        record = dict(data, num=1, seed=seeds[part], prompt=_collapse(prompts[part]),
                      neg_prompt=_collapse(negatives[part]))
        for offset, image in enumerate(images):
            info = {"index_in_batch": offset, "loaded": model.loaded, "device": str(model.device),
                    "dtype": str(model.dtype).replace("torch.", "")}
            written.append(save_image_with_record(
                image, output_dir, index, seeds[part][offset], prompts[part][offset], negatives[part][offset],
                dict(record, generated=info), shown, save_record=bool((data.get("save") or {}).get("save_cfg", True))))
            index += 1
    print(f"wrote {len(written)} image(s) to {output_dir}", file=sys.stderr)
    return written


def _user_errors() -> tuple:
    from .infer.model import InferenceModelError
    from .infer.samplers import SamplerError
    from .models.loading import ModelLoadError
    from .plugins.lora import LoraBlockError

    errors = [VisualizerConfigError, InferenceModelError, SamplerError, ModelLoadError, LoraBlockError,
              FileNotFoundError]
    try:
        from .plugins.embedding_files import EmbeddingFormatError

        errors.append(EmbeddingFormatError)
    except ImportError:  # pragma: no cover - older checkouts
        pass
    return tuple(errors)


def task(cfg: DictConfig) -> list[Path]:
    try:
        return run_visualizer(cfg)
    except _user_errors() as error:  # a config/model problem: one clear line, no traceback
        raise SystemExit(f"error: {error}") from error


def main(argv: Optional[list[str]] = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from .config.launcher import run_hydra

    args = quote_free_text(list(sys.argv[1:] if argv is None else argv))
    run_hydra(task, config_name=CONFIG_NAME, argv=args, cfg_group=CFG_GROUP)


if __name__ == "__main__":
    main()
