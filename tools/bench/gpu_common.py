"""The driver behind gpu_sd15.py and gpu_sdxl.py: a full-size architecture from the published configs
shipped in the package (random weights, nothing downloaded), bf16, LoRA, several batch sizes, the
framework and the minimal diffusers + PEFT loop side by side; it/s, images/s, peak GPU memory, MFU.

`--device cpu --tiny` swaps in the tiny model at 64 px so the scripts can be smoke-tested without a GPU.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import common

# Speed levers: our config keys (`++` adds a key that the shipped config may not define yet).
# The lever sweeps compare each lever against BASELINE_OVERRIDES (SDPA on, everything else off).
BASELINE_OVERRIDES = ["++model.attention=sdpa", "++optimizer.fused=false"]
LEVER_OVERRIDES = {
    "default_attention": ["++model.attention=default"],  # SDPA's effect, seen from the other side
    "channels_last": ["++model.channels_last=true"],
    "compile": ["++model.compile=true"],
    "fused_adamw": ["++optimizer.fused=true"],
    "cache_text_embeddings": ["++model.cache_text_embeddings=true"],
    "cache_latents": ["++data.dataset1.cache_latents=memory"],
    "gradient_checkpointing": ["model.gradient_checkpointing=true"],
}
# The same levers as ReferenceOptions fields of the hand-written loop.
LEVER_REFERENCE_FIELDS = {
    "default_attention": ("attention", "default"), "channels_last": ("channels_last", True),
    "compile": ("compile", True), "fused_adamw": ("fused_adamw", True),
    "cache_text_embeddings": ("cache_text_embeddings", True), "cache_latents": ("cache_latents", True),
    "gradient_checkpointing": ("gradient_checkpointing", True),
}


# Dense bf16 tensor-core peaks (TFLOP/s, vendor datasheets, no sparsity), matched in the device name.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L40": 181.0, "A10G": 70.0,
                    "L4": 121.0, "4090": 165.2, "3090": 71.0, "A6000": 154.8}


@dataclass
class ModelSpec:
    config_name: str  # folder under hcpdiff_like/models/configs/
    family: str       # sd1 | sdxl
    resolution: int   # training size in pixels
    title: str


def build_parser(spec: ModelSpec, doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny model at 64 px (smoke test; the only CPU mode)")
    parser.add_argument("--batch-sizes", default="1,2,4,8", help="comma-separated batch sizes")
    parser.add_argument("--resolution", type=int, default=None, help=f"pixels (default {spec.resolution}; tiny: 64)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per case")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--mixed-precision", default="bf16", choices=["bf16", "fp16", "no"])
    parser.add_argument("--impl", default="both", choices=["both", "framework", "reference"])
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 4 on GPU, 0 on CPU)")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "default"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (model.compile)")
    parser.add_argument("--fused-adamw", default="auto", choices=["auto", "true", "false"],
                        help="auto = fused on CUDA (the framework's default, optimizer.fused: null)")
    parser.add_argument("--cache-text-embeddings", action="store_true")
    parser.add_argument("--cache-latents", action="store_true", help="latents encoded once before training")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--lever-sweep", default="", help="comma-separated levers, or 'all': each lever alone vs the "
                        f"baseline, framework only, at the first batch size. Levers: {', '.join(LEVER_OVERRIDES)}")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by GPU name)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FlopCounterMode pass")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    return parser


def check_device(args, spec: ModelSpec, script: str) -> None:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: {script} measures full-size {spec.title} on a CUDA GPU, and this machine has none. "
                         f"For a CPU smoke test of the script itself: python {script} --device cpu --tiny")
    if args.device == "cpu" and not args.tiny:
        raise SystemExit(f"error: full-size {spec.title} on the CPU is no benchmark; add --tiny for a smoke test")


def random_components(config_name: str, device) -> dict:
    """Components of a published architecture with random weights, built on `device` (no download)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from hcpdiff_like.models.configs import published_config_dir
    from hcpdiff_like.models.tiny import write_byte_level_tokenizer

    folder = published_config_dir(config_name)
    # The configs ship no vocabulary: a byte-level CLIP tokenizer (ids 0..513) stands in; sequence
    # length (77) and every tensor shape are those of the real model.
    tokenizer = CLIPTokenizer.from_pretrained(write_byte_level_tokenizer(Path(tempfile.mkdtemp()) / "tok"),
                                              model_max_length=77)
    torch.manual_seed(0)
    with torch.device(device):
        components = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
                      "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
                      "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
                      "tokenizer": tokenizer}
        if (folder / "text_encoder_2").is_dir():
            components["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
            components["tokenizer_2"] = tokenizer
    components["noise_scheduler"] = DDPMScheduler.from_config(DDPMScheduler.load_config(folder / "scheduler"))
    return components


def bundle_factory(spec: ModelSpec, device):
    """For the Trainer: a ModelBundle of fresh random components instead of a model folder."""
    from hcpdiff_like.models.loading import ModelBundle

    def build():
        parts = random_components(spec.config_name, device)
        return ModelBundle(family=spec.family, unet=parts["unet"], vae=parts["vae"],
                           noise_scheduler=parts["noise_scheduler"], tokenizer=parts["tokenizer"],
                           text_encoder=parts["text_encoder"], tokenizer_2=parts.get("tokenizer_2"),
                           text_encoder_2=parts.get("text_encoder_2"), source=f"random {spec.config_name}")
    return build


def lever_settings(args) -> tuple[list[str], dict]:
    """The flags as framework overrides and as ReferenceOptions fields (the same settings for both)."""
    overrides, fields = [f"++model.attention={args.attention}"], {"attention": args.attention}
    for flag, lever in (("channels_last", "channels_last"), ("compile", "compile"),
                        ("cache_text_embeddings", "cache_text_embeddings"), ("cache_latents", "cache_latents"),
                        ("gradient_checkpointing", "gradient_checkpointing")):
        if getattr(args, flag):
            overrides += LEVER_OVERRIDES[lever]
            fields[LEVER_REFERENCE_FIELDS[lever][0]] = True
    if args.fused_adamw != "auto":
        overrides.append(f"++optimizer.fused={args.fused_adamw}")
        fields["fused_adamw"] = args.fused_adamw == "true"
    return overrides, fields


class Bench:
    def __init__(self, spec: ModelSpec, args, images: Path):
        self.spec, self.args, self.images = spec, args, images
        self.resolution = args.resolution or (64 if args.tiny else spec.resolution)
        self.family = ("sd1" if spec.family == "sd1" else "sdxl") if args.tiny else spec.family
        self.workers = args.workers if args.workers is not None else (4 if args.device == "cuda" else 0)

    def framework(self, batch_size: int, overrides: list[str]) -> common.LoopResult:
        model = ([f"model.pretrained_model_name_or_path=tiny:{self.family}"] if self.args.tiny else
                 [f"model.pretrained_model_name_or_path=random:{self.spec.config_name}", f"model.family={self.family}"])
        base = ["cfg=demo", f"cpu={str(self.args.device == 'cpu').lower()}", f"mixed_precision={self.args.mixed_precision}",
                f"plugin.rank={self.args.rank}", "train.lr=1e-4", f"train.workers={self.workers}",
                "model.gradient_checkpointing=false", f"data.dataset1.batch_size={batch_size}",
                f"data.dataset1.resolution={self.resolution}", f"data.dataset1.sources.shapes.img_dir={self.images}"]
        factory = None if self.args.tiny else bundle_factory(self.spec, self.args.device)
        return common.run_framework(base + model + overrides, self.args.warmup, self.args.steps, self.args.device,
                                    factory, measure_flops=not self.args.no_flops)

    def reference(self, batch_size: int, fields: dict) -> common.LoopResult:
        common.release_gpu_memory(self.args.device)  # the previous case's model first
        components = (common.load_tiny_components(self.family) if self.args.tiny
                      else random_components(self.spec.config_name, self.args.device))
        options = common.ReferenceOptions(images=self.images, resolution=self.resolution, batch_size=batch_size,
                                          rank=self.args.rank, mixed_precision=self.args.mixed_precision,
                                          device=self.args.device, workers=self.workers)
        return common.run_reference(components, replace(options, **fields), self.args.warmup, self.args.steps,
                                    measure_flops=not self.args.no_flops)


def peak_tflops(args):
    import torch

    if args.peak_tflops:
        return args.peak_tflops
    if args.device == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)
    return None


def figures(result: common.LoopResult, batch_size: int, peak) -> dict:
    seconds = result.seconds_per_step
    row = {"impl": result.name, "batch_size": batch_size, "seconds_per_step": seconds, "it_per_s": 1 / seconds,
           "images_per_s": batch_size / seconds, "peak_memory_gib": None, "tflop_per_step": None, "mfu": None,
           "trainable_parameters": result.trainable_parameters}
    if result.peak_memory_bytes is not None:
        row["peak_memory_gib"] = result.peak_memory_bytes / 2 ** 30
    if result.flops_per_step:
        row["tflop_per_step"] = result.flops_per_step / 1e12
        row["achieved_tflops"] = result.flops_per_step / seconds / 1e12
        if peak:
            row["mfu"] = row["achieved_tflops"] / peak
    return row


def _fmt(value, pattern: str) -> str:
    return "n/a" if value is None else format(value, pattern)


def print_row(row: dict) -> None:
    print(f"{row['impl']:<10} batch {row['batch_size']:>2}: {row['it_per_s']:8.3f} it/s, {row['images_per_s']:8.3f} "
          f"images/s, peak memory {_fmt(row['peak_memory_gib'], '.2f')} GiB, {_fmt(row['tflop_per_step'], '.4f')} "
          f"TFLOP/step, MFU {_fmt(row['mfu'], '.1%')}")


def main(spec: ModelSpec, argv, doc: str, script: str) -> dict:
    args = build_parser(spec, doc).parse_args(argv)
    common.prepare_environment()
    check_device(args, spec, script)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from hcpdiff_like.data.demo import make_demo_dataset

    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    machine = common.machine_summary()
    common.print_machine(machine)
    peak = peak_tflops(args)
    overrides, fields = lever_settings(args)
    report = {"machine": machine, "model": spec.config_name if not args.tiny else f"tiny:{spec.family}",
              "args": {k: str(v) for k, v in vars(args).items()}, "peak_tflops": peak, "rows": [], "levers": []}
    with tempfile.TemporaryDirectory(prefix="hcp-gpu-bench-") as tmp:
        bench = Bench(spec, args, Path(tmp) / "images")
        make_demo_dataset(bench.images, count=max(8, 2 * max(batch_sizes)), size=(bench.resolution,) * 2)
        print(f"setup: {report['model']} at {bench.resolution} px, LoRA rank {args.rank} on UNet attention + "
              f"feed-forward, precision {args.mixed_precision}, {args.warmup} warm-up + {args.steps} timed steps, "
              f"levers {overrides + [f'fused_adamw={args.fused_adamw}']}, peak {peak} TFLOP/s")
        for batch_size in batch_sizes:
            results = []
            for impl, run in (("framework", lambda: bench.framework(batch_size, overrides)),
                              ("reference", lambda: bench.reference(batch_size, fields))):
                if args.impl not in ("both", impl):
                    continue
                try:
                    results.append(run())
                except Exception as error:  # out of GPU memory at this batch size: report it, go on
                    if "out of memory" not in str(error).lower():
                        raise
                    common.release_gpu_memory(args.device)
                    print(f"{impl:<10} batch {batch_size:>2}: out of GPU memory ({type(error).__name__}); "
                          "try --gradient-checkpointing")
                    report["rows"].append({"impl": impl, "batch_size": batch_size, "error": "out of memory"})
            for result in results:
                report["rows"].append(figures(result, batch_size, peak))
                print_row(report["rows"][-1])
            if len(results) == 2:
                print(f"           batch {batch_size:>2}: framework/reference time ratio "
                      f"{results[0].seconds_per_step / results[1].seconds_per_step:.3f}")
        levers = list(LEVER_OVERRIDES) if args.lever_sweep == "all" else \
            [x for x in args.lever_sweep.split(",") if x]
        if levers:
            report["levers"] = sweep_levers(bench, batch_sizes[0], levers)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


def sweep_levers(bench: Bench, batch_size: int, levers: list[str]) -> list[dict]:
    """Each lever alone against the baseline (SDPA on, all else off), framework only."""
    unknown = [x for x in levers if x not in LEVER_OVERRIDES]
    if unknown:
        raise SystemExit(f"error: unknown lever(s) {unknown}; known: {', '.join(LEVER_OVERRIDES)}")
    baseline = bench.framework(batch_size, BASELINE_OVERRIDES)
    print(f"lever baseline (batch {batch_size}): {baseline.seconds_per_step:.4f} s/step, peak memory "
          f"{_fmt(baseline.peak_memory_bytes and baseline.peak_memory_bytes / 2 ** 30, '.2f')} GiB")
    rows = []
    for lever in levers:
        try:
            result = bench.framework(batch_size, BASELINE_OVERRIDES + LEVER_OVERRIDES[lever])
        except Exception as error:  # e.g. torch.compile without a working compiler: report, go on
            print(f"lever {lever:<24} failed: {type(error).__name__}: {str(error)[:300]}")
            rows.append({"lever": lever, "overrides": LEVER_OVERRIDES[lever], "error": str(error)[:300]})
            continue
        speedup = baseline.seconds_per_step / result.seconds_per_step
        rows.append({"lever": lever, "overrides": LEVER_OVERRIDES[lever], "batch_size": batch_size,
                     "seconds_per_step": result.seconds_per_step, "baseline_seconds_per_step": baseline.seconds_per_step,
                     "speedup": speedup, "peak_memory_bytes": result.peak_memory_bytes})
        print(f"lever {lever:<24} {' '.join(LEVER_OVERRIDES[lever]):<42} {result.seconds_per_step:.4f} s/step, "
              f"x{speedup:.3f} vs baseline, peak memory "
              f"{_fmt(result.peak_memory_bytes and result.peak_memory_bytes / 2 ** 30, '.2f')} GiB")
    return rows
