"""Score every saved checkpoint of a run with CLIP: which step to keep, and when it started to overfit.

    python -m hcpdiff_like.tools.evaluate_checkpoints exps/<timestamp> --clip_model /models/clip-vit-base-patch32 \\
        --prompts prompts.txt --training_images /data/surtr_dataset [--steps 500 1000] [--baseline]

For each step (ckpts/unet-<step>.safetensors, text_encoder-<step>..., <word>-<step>.pt) the run's base model
is loaded, the step is merged at --merge_alpha, and every prompt is rendered (`{step}` in a prompt becomes
the step, so `{surtr_arknights-{step}:1.2}` uses that step's trained word). Prompts: a .txt in kohya's syntax
(`a photo --n blurry --w 512 --h 512 --d 1 --l 7 --s 25`), or a .yaml/.json list. Writes
<out_dir>/scores.json, <out_dir>/scores.png (score vs step) and the images under <out_dir>/step-<N>/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

METRICS = ("image_text_similarity", "training_image_similarity", "diversity")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hcpdiff_like.tools.evaluate_checkpoints",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("exp_dir", help="experiment dir of a training run (with ckpts/ and cfg.yaml)")
    parser.add_argument("--clip_model", required=True, help="local CLIP model folder (CLIPModel + processor files)")
    parser.add_argument("--prompts", required=True, help=".txt (kohya prompt lines) or .yaml/.json prompt list")
    parser.add_argument("--training_images", help="folder of training images, for the training-set similarity")
    parser.add_argument("--steps", type=int, nargs="*", help="steps to evaluate (default: every saved step)")
    parser.add_argument("--baseline", action="store_true", help="also score the base model alone (step 0)")
    parser.add_argument("--pretrained_model", help="base model (default: the run's, from cfg.yaml)")
    parser.add_argument("--merge_alpha", type=float, default=0.85, help="LoRA strength (default 0.85)")
    parser.add_argument("--out_dir", help="output folder (default: <exp_dir>/eval)")
    parser.add_argument("--neg_prompt", default="", help="negative prompt for prompts that set none")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--sampler", default="euler", help="ddim, euler, euler_a, dpm++_2m_karras, ...")
    parser.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i unless it sets --d")
    parser.add_argument("--images_per_prompt", type=int, default=1, help="images per prompt (seeds seed+i+k*N)")
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    parser.add_argument("--device", help="cuda / cpu (default: cuda if available)")
    return parser


def _run_model_options(exp_dir: Path) -> dict:
    cfg_path = exp_dir / "cfg.yaml"
    model = (OmegaConf.to_container(OmegaConf.load(cfg_path)).get("model") or {}) if cfg_path.is_file() else {}
    return model


def evaluate(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    from ..infer.clip_scoring import ClipScorer, load_images
    from ..infer.generate import GenerationSettings, ImageGenerator
    from ..infer.model import InferenceModelError, load_inference_model, run_steps
    from ..infer.samplers import canonical_sampler
    from ..infer.training_samples import SamplePrompt, read_prompt_entries

    exp_dir = Path(os.path.expanduser(args.exp_dir))
    ckpt_dir = exp_dir / "ckpts"
    if not ckpt_dir.is_dir():
        raise InferenceModelError(f"{exp_dir} has no ckpts/ folder (is it an experiment dir?)")
    saved = run_steps(ckpt_dir)
    steps = list(args.steps) if args.steps else saved
    missing = sorted(set(steps) - set(saved))
    if missing:
        raise InferenceModelError(f"--steps {missing}: not saved in {ckpt_dir}; saved steps: {saved}")
    if not steps and not args.baseline:
        raise InferenceModelError(f"no checkpoints in {ckpt_dir}")
    canonical_sampler(args.sampler)
    defaults = SamplePrompt(prompt="", neg_prompt=args.neg_prompt, width=args.width, height=args.height,
                            seed=args.seed, guidance_scale=args.guidance_scale,
                            num_inference_steps=args.num_inference_steps, sampler=args.sampler)
    entries = read_prompt_entries(args.prompts, "--prompts")
    if not entries:
        raise InferenceModelError(f"--prompts {args.prompts}: no prompts in it")
    prompts = [replace(defaults, **dict({"seed": args.seed + i}, **{k: v for k, v in e.items() if v is not None}))
               for i, e in enumerate(entries)]
    model_options = _run_model_options(exp_dir)
    pretrained = args.pretrained_model or model_options.get("pretrained_model_name_or_path")
    if not pretrained:
        raise InferenceModelError(f"{exp_dir / 'cfg.yaml'} names no base model; pass --pretrained_model")
    scorer = ClipScorer(args.clip_model, device=args.device)  # fails on a bad path before any rendering
    training_features = scorer.image_features(load_images(args.training_images)) if args.training_images else None
    out_dir = Path(os.path.expanduser(args.out_dir)) if args.out_dir else exp_dir / "eval"

    results = []
    for step in tqdm(([0] if args.baseline else []) + steps, desc="checkpoints", unit="step"):
        model = load_inference_model(pretrained, family=model_options.get("family"),
                                     exp_dir=str(exp_dir) if step else None, step=step or None,
                                     merge_alpha=args.merge_alpha, clip_skip=int(model_options.get("clip_skip") or 0),
                                     clip_final_norm=bool(model_options.get("clip_final_norm", True)),
                                     n_repeats=int(model_options.get("tokenizer_repeats") or 1), dtype=args.dtype,
                                     device=args.device)
        generator = ImageGenerator(model.bundle, model.conditioner, model.device, progress=False)
        images, texts, files = [], [], []
        for index, prompt in enumerate(prompts):
            text = prompt.prompt.replace("{step}", str(step))
            settings = GenerationSettings(width=prompt.width, height=prompt.height,
                                          num_inference_steps=prompt.num_inference_steps,
                                          guidance_scale=prompt.guidance_scale, sampler=prompt.sampler,
                                          n_repeats=int(model_options.get("tokenizer_repeats") or 1))
            seeds = [prompt.seed + k * len(prompts) for k in range(args.images_per_prompt)]
            made = generator.generate([text] * len(seeds), [prompt.neg_prompt] * len(seeds), seeds, settings)
            for seed, image in zip(seeds, made):
                path = out_dir / f"step-{step}" / f"{index:03d}-{seed}.png"
                _save_png(image, path)
                images.append(image)
                texts.append(text)
                files.append(str(path))
        results.append({"step": step, **scorer.scores(images, texts, training_features), "images": files,
                        "prompts": texts})
        del model, generator
    report = {"exp_dir": str(exp_dir), "clip_model": str(args.clip_model), "pretrained_model": str(pretrained),
              "training_images": args.training_images, "merge_alpha": args.merge_alpha,
              "prompts": [asdict(p) for p in prompts], "steps": results}
    _write_json(report, out_dir / "scores.json")
    plot_scores(results, out_dir / "scores.png", title=exp_dir.name)
    return report


def _save_png(image, path: Path) -> None:
    from ..training.checkpoints import atomic_write

    atomic_write(path, lambda temp: image.save(temp, format="PNG"))


def _write_json(report: dict, path: Path) -> None:
    from ..training.checkpoints import atomic_write

    text = json.dumps(report, indent=2)
    atomic_write(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))


def plot_scores(results: list[dict], path: Path, title: Optional[str] = None) -> Path:
    """One line per metric, score vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..training.checkpoints import atomic_write

    figure, axis = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in results]
    for metric in METRICS:
        if all(metric in r for r in results):
            axis.plot(steps, [r[metric] for r in results], marker="o", label=metric.replace("_", " "))
    axis.set_xlabel("step")
    axis.set_ylabel("CLIP score")
    axis.set_title(f"checkpoint scores: {title}" if title else "checkpoint scores")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    atomic_write(path, lambda temp: figure.savefig(temp, format="png", dpi=100))
    plt.close(figure)
    return path


def main(argv: Optional[list[str]] = None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    from ..infer.clip_scoring import ClipModelError
    from ..infer.model import InferenceModelError
    from ..infer.samplers import SamplerError
    from ..infer.training_samples import SamplePromptError
    from ..models.loading import ModelLoadError

    try:
        report = evaluate(args)
    except (ClipModelError, InferenceModelError, SamplerError, SamplePromptError, ModelLoadError) as error:
        raise SystemExit(f"error: {error}") from error
    best = max(report["steps"], key=lambda r: r["image_text_similarity"])
    print(f"scored {len(report['steps'])} checkpoint(s); best image-text similarity at step {best['step']}: "
          f"{best['image_text_similarity']:.4f}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
