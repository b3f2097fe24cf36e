"""Shared pieces of the benchmarks in tools/bench/: environment, step clocks, the two training loops
(the framework's Trainer, and a minimal hand-written diffusers + PEFT + torch loop), FLOP counting and
a description of the machine. Benchmarks print figures; nothing here asserts a timing.
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]

from bench_stats import median, paired_ratio, verdict  # noqa: E402,F401  (re-exported for the scripts)

# The framework's default UNet LoRA layers (cfgs/plugin/lora_unet.yaml: attention + feed-forward
# blocks, expanded to their Linear layers), written as the PEFT regex the reference loop uses.
UNET_LORA_LAYERS = ["re:.*\\.attn.?$", "re:.*\\.ff$"]
PEFT_UNET_TARGETS = r".*\.(attn\d?|ff)\.(to_q|to_k|to_v|to_out\.0|net\.0\.proj|net\.2)"

def prepare_environment() -> None:
    """Offline and quiet, like `python -m hcpdiff_like.train`."""
    for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
                       "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}.items():
        os.environ.setdefault(key, value)


def machine_summary() -> dict:
    """CPU model, core count, torch/diffusers/peft versions and the GPU (if any)."""
    import diffusers
    import peft
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    with contextlib.suppress(OSError, AttributeError):  # other jobs on the machine skew every figure
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    return info


def print_machine(info: dict) -> None:
    print("machine: " + ", ".join(f"{key} {value}" for key, value in info.items()))


# -- step clocks -------------------------------------------------------------------------------------
def synchronize(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class StepMarks:
    """Records the time at the start of every call of a wrapped step function. The gap between two
    marks is one whole loop iteration: the step, logging/progress after it and the next batch fetch."""

    def __init__(self, device="cpu", sync_at: tuple = ()):
        self.device = device
        self.sync_at = set(sync_at)  # mark indices that wait for the GPU (first and last timed marks)
        self.marks: list[float] = []
        self.cpu_marks: list[float] = []  # process CPU time: less disturbed by other jobs on a shared machine

    def mark(self) -> None:
        if len(self.marks) in self.sync_at:
            synchronize(self.device)
        self.marks.append(time.perf_counter())
        self.cpu_marks.append(time.process_time())

    def pop(self) -> None:
        self.marks.pop()
        self.cpu_marks.pop()

    def wrap(self, step: Callable) -> Callable:
        def timed(*args, **kwargs):
            self.mark()
            return step(*args, **kwargs)
        return timed

    def steady_seconds(self, warmup: int, cpu: bool = False) -> list[float]:
        """Per-step seconds (wall clock, or process CPU time), the first `warmup` steps left out."""
        marks = self.cpu_marks if cpu else self.marks
        gaps = [later - earlier for earlier, later in zip(marks, marks[1:])]
        return gaps[warmup:]


def release_gpu_memory(device) -> None:
    """Free what the previous case left (cycles included) and restart the peak-memory counter."""
    import gc

    import torch

    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# -- the framework -----------------------------------------------------------------------------------
@dataclass
class LoopResult:
    """Steady-state per-step seconds of one run plus what it trained."""

    name: str
    step_seconds: list
    trainable_parameters: int
    step_cpu_seconds: list = field(default_factory=list)
    final_loss: float = float("nan")
    flops_per_step: Optional[float] = None
    peak_memory_bytes: Optional[int] = None
    extras: dict = field(default_factory=dict)

    @property
    def seconds_per_step(self) -> float:
        return statistics.mean(self.step_seconds) if self.step_seconds else float("nan")

    @property
    def cpu_seconds_per_step(self) -> float:
        return statistics.mean(self.step_cpu_seconds) if self.step_cpu_seconds else float("nan")


@contextlib.contextmanager
def patched_model_loader(bundle_factory: Optional[Callable]):
    """Let the Trainer train a bundle built in memory (random full-size weights) instead of loading one."""
    if bundle_factory is None:
        yield
        return
    from unittest import mock

    from hcpdiff_like.training import trainer as trainer_module

    with mock.patch.object(trainer_module, "load_model_bundle", lambda *args, **kwargs: bundle_factory()):
        yield


def count_flops(step: Callable) -> Optional[float]:
    """FLOPs of one call of `step` (forward + backward) by torch's FlopCounterMode; None if it fails."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            step()
        return float(counter.get_total_flops())
    except Exception as error:  # an op the counter cannot trace (e.g. under torch.compile)
        print(f"note: FLOP count failed ({type(error).__name__}: {error})")
        return None


def run_framework(overrides: list[str], warmup: int, steps: int, device="cpu", bundle_factory=None,
                  measure_flops: bool = False) -> LoopResult:
    """Compose the config like the CLI, run Trainer.setup()/train() and time every loop iteration."""
    import torch

    from hcpdiff_like.config.launcher import compose_config
    from hcpdiff_like.config.validation import validate_config
    from hcpdiff_like.training.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="hcp-bench-") as exp_root:
        cfg = compose_config(list(overrides) + [f"exp_root={exp_root}", f"train.train_steps={warmup + steps + 1}",
                                                "train.save_step=1000000000"])
        validate_config(cfg)
        release_gpu_memory(device)
        with patched_model_loader(bundle_factory):
            trainer = Trainer(cfg, exp_dir=str(Path(exp_root) / "run")).setup()
        clock = StepMarks(device, sync_at=(warmup, warmup + steps))
        untimed_step = trainer.train_step
        trainer.train_step = clock.wrap(untimed_step)
        try:
            summary = trainer.train()
            peak = torch.cuda.max_memory_allocated() if str(device).startswith("cuda") else None
            flops = None
            if measure_flops:
                streams = [iter(d.forever()) for d in trainer.datasets]
                batches = [next(s) for s in streams]
                flops = count_flops(lambda: untimed_step(batches))
            trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        finally:
            trainer.cleanup()
        result = LoopResult("framework", clock.steady_seconds(warmup), trainable, clock.steady_seconds(warmup, True),
                            summary["final_loss"], flops, peak)
        del trainer
    return result


# -- the reference: diffusers + PEFT + torch, nothing else -------------------------------------------
class CaptionedImages:
    """Images with same-name .txt captions, resized to cover the target size and centre-cropped."""

    def __init__(self, folder: Path, resolution: int):
        self.paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        import numpy as np
        import torch
        from PIL import Image, ImageOps

        path = self.paths[index]
        with Image.open(path) as image:
            original = (image.height, image.width)
            image = ImageOps.fit(image.convert("RGB"), (self.resolution, self.resolution), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.exists() else ""
        size_info = torch.tensor([*original, 0, 0, self.resolution, self.resolution], dtype=torch.float32)
        return {"pixel_values": pixels, "caption": caption, "size_info": size_info, "index": index}


def collate_captioned(items: list[dict]) -> dict:
    import torch

    return {"pixel_values": torch.stack([i["pixel_values"] for i in items]),
            "captions": [i["caption"] for i in items], "size_info": torch.stack([i["size_info"] for i in items]),
            "index": [i["index"] for i in items]}


@dataclass
class ReferenceOptions:
    images: Path
    resolution: int
    batch_size: int = 2
    rank: int = 4
    lr: float = 1e-4
    seed: int = 114514
    mixed_precision: str = "no"  # no | bf16 | fp16
    device: str = "cpu"
    workers: int = 0
    max_grad_norm: float = 1.0
    warmup_lr_steps: int = 10
    attention: Optional[str] = None  # sdpa | default | None = diffusers' default (SDPA)
    channels_last: bool = False
    compile: bool = False
    fused_adamw: Optional[bool] = None  # None = fused on CUDA (the framework's default)
    cache_text_embeddings: bool = False
    cache_latents: bool = False
    gradient_checkpointing: bool = False


def _encode_text(components: dict, captions: list[str], device):
    """SD1/SD2: last hidden state; SDXL: both encoders' penultimate layers + pooled (diffusers' recipe)."""
    import torch

    hidden_states, pooled = [], None
    sdxl = "text_encoder_2" in components
    pairs = [("tokenizer", "text_encoder")] + ([("tokenizer_2", "text_encoder_2")] if sdxl else [])
    for tokenizer_key, encoder_key in pairs:
        ids = components[tokenizer_key](captions, padding="max_length", max_length=77, truncation=True,
                                        return_tensors="pt").input_ids.to(device)
        output = components[encoder_key](ids, output_hidden_states=sdxl)
        hidden_states.append(output.hidden_states[-2] if sdxl else output.last_hidden_state)
        pooled = output[0] if sdxl else None
    return torch.cat(hidden_states, dim=-1), pooled


def run_reference(components: dict, options: ReferenceOptions, warmup: int, steps: int,
                  measure_flops: bool = False) -> LoopResult:
    """A minimal LoRA loop over `components` (unet, vae, scheduler, tokenizer(s), text_encoder(s))."""
    import torch
    import torch.nn.functional as F
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    torch.manual_seed(options.seed)
    device = torch.device(options.device)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(options.mixed_precision)
    unet, vae, noise_scheduler = components["unet"], components["vae"], components["noise_scheduler"]
    encoders = [components[k] for k in ("text_encoder", "text_encoder_2") if k in components]
    for module in [unet, vae, *encoders]:
        module.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=options.rank, lora_alpha=options.rank, init_lora_weights=True,
                                target_modules=PEFT_UNET_TARGETS))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    for module in [unet, *encoders]:  # frozen weights in the half dtype, LoRA weights stay fp32
        for param in module.parameters():
            if half is not None and not param.requires_grad:
                param.data = param.data.to(half)
        module.to(device)
    vae.to(device)
    if options.attention == "default":
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    if options.channels_last:
        unet.to(memory_format=torch.channels_last)
    if options.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if options.compile:
        unet.compile()  # in place, like the framework's model.compile
    forward = unet
    fused = device.type == "cuda" if options.fused_adamw is None else options.fused_adamw
    optimizer = torch.optim.AdamW(trainable, lr=options.lr, weight_decay=1e-2, fused=fused or None)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=options.warmup_lr_steps)
    images = CaptionedImages(options.images, options.resolution)
    loader = torch.utils.data.DataLoader(images,
                                         batch_size=options.batch_size, shuffle=True, drop_last=True,
                                         num_workers=options.workers, collate_fn=collate_captioned,
                                         persistent_workers=options.workers > 0)
    text_cache: dict = {}
    sdxl = "text_encoder_2" in components
    latent_cache = {}
    if options.cache_latents:  # every image encoded once, before the loop (not timed)
        with torch.no_grad():
            for index in range(len(images)):
                pixels = images[index]["pixel_values"][None].to(device, vae.dtype)
                latent_cache[index] = vae.encode(pixels).latent_dist.sample()[0] * vae.config.scaling_factor

    def conditioning(batch):
        key = tuple(batch["captions"])
        if options.cache_text_embeddings and key in text_cache:
            return text_cache[key]
        with torch.no_grad(), torch.autocast(device.type, dtype=half, enabled=half is not None):
            hidden, pooled = _encode_text(components, batch["captions"], device)
        added = {"text_embeds": pooled, "time_ids": batch["size_info"].to(device)} if sdxl else None
        if options.cache_text_embeddings:
            text_cache[key] = (hidden, added)
        return hidden, added

    def step(batch) -> torch.Tensor:
        with torch.no_grad():
            if latent_cache:
                latents = torch.stack([latent_cache[int(i)] for i in batch["index"]])
            else:
                pixels = batch["pixel_values"].to(device, vae.dtype)
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        hidden, added = conditioning(batch)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(device.type, dtype=half, enabled=half is not None):
            prediction = forward(noisy, timesteps, hidden, added_cond_kwargs=added, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        if options.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, options.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    release_gpu_memory(device)
    clock, loss, total = StepMarks(device, sync_at=(warmup, warmup + steps)), None, warmup + steps + 1
    done = 0
    while done < total:
        batches = iter(loader)
        while done < total:
            clock.mark()
            batch = next(batches, None)
            if batch is None:
                clock.pop()
                break
            loss = step(batch)
            done += 1
    synchronize(device)
    peak = torch.cuda.max_memory_allocated() if str(device).startswith("cuda") else None
    flops = count_flops(lambda: step(next(iter(loader)))) if measure_flops else None
    return LoopResult("reference", clock.steady_seconds(warmup), sum(p.numel() for p in trainable),
                      clock.steady_seconds(warmup, True), float(loss) if loss is not None else float("nan"),
                      flops, peak)


def load_tiny_components(family: str) -> dict:
    """The tiny model's components straight from its diffusers folder (the reference loop's input)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from hcpdiff_like.models.tiny import tiny_model_path

    folder = tiny_model_path(family)
    components = {"unet": UNet2DConditionModel.from_pretrained(folder / "unet"),
                  "vae": AutoencoderKL.from_pretrained(folder / "vae"),
                  "noise_scheduler": DDPMScheduler.from_pretrained(folder / "scheduler"),
                  "tokenizer": CLIPTokenizer.from_pretrained(folder / "tokenizer", model_max_length=77),
                  "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder")}
    if family == "sdxl":
        components["tokenizer_2"] = CLIPTokenizer.from_pretrained(folder / "tokenizer_2", model_max_length=77)
        components["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")
    return components


def format_seconds(values: list[float]) -> str:
    return ", ".join(f"{v:.4f}" for v in values)
