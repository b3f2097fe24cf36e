"""Write our LoRA files for tests: attach LoRA blocks to a freshly loaded tiny model, give every LoRA tensor
random non-zero values (lora_B starts at zero otherwise), save with lora_state_dict + lora_metadata.

Imported by tests/convert and tests/tools as `from convert.lora_factory import ...` (tests/ is on sys.path).
"""
from __future__ import annotations

from pathlib import Path

import torch

from hcpdiff_like.models.loading import load_model_bundle
from hcpdiff_like.plugins.lora import attach_lora_blocks, lora_metadata, lora_state_dict
from hcpdiff_like.training.checkpoints import save_safetensors

# kohya-like: one alpha for linear layers, LoCon convs with their own rank/alpha
UNET_BLOCKS = [{"layers": [r"re:.*\.attn1$", r"re:.*\.attn2$"], "rank": 4, "alpha": 2},
               {"layers": [r"re:.*\.ff$"], "rank": 4, "alpha": 2},
               {"layers": [r"re:down_blocks\.0\.resnets\.0$", r"re:up_blocks\.\d\.resnets\.0$"], "rank": 2,
                "alpha": 1}]
TE_BLOCKS = [{"layers": [r"re:.*self_attn$", r"re:.*mlp$"], "rank": 4, "alpha": 2}]
TE2_BLOCKS = [{"layers": [r"re:.*self_attn$"], "rank": 2, "alpha": 2}]


def randomize_lora(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(marker in name for marker in ("lora_", "hada_", "lokr_")):
                param.copy_(torch.randn(param.shape, generator=generator) * std)


_DEFAULT_FILES: dict[tuple, dict[str, Path]] = {}  # the default files, written once per session


def make_lora_files(model_path, family: str, out_dir: Path, blocks: dict | None = None, seed: int = 0,
                    step: int = 5) -> dict[str, Path]:
    """{target: our LoRA file}; `blocks` maps target -> block list (default: UNet with LoCon + TE(s)).
    Tests only read these files, so the default set is written once and shared."""
    key = (str(model_path), family, seed, step)
    if blocks is None and key in _DEFAULT_FILES and all(p.exists() for p in _DEFAULT_FILES[key].values()):
        return _DEFAULT_FILES[key]
    default = blocks is None
    bundle = load_model_bundle(str(model_path))
    if blocks is None:
        blocks = {"unet": UNET_BLOCKS, "text_encoder": TE_BLOCKS}
        if family == "sdxl":
            blocks["text_encoder_2"] = TE2_BLOCKS
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for index, (target, target_blocks) in enumerate(blocks.items()):
        model = getattr(bundle, target)
        specs = attach_lora_blocks(model, target_blocks, target)
        randomize_lora(model, seed + index)
        metadata = lora_metadata(specs, target, family)
        metadata.update({"hcpdiff_like.family": family, "hcpdiff_like.step": str(step)})
        files[target] = save_safetensors(lora_state_dict(model, specs), out_dir / f"{target}-{step}.safetensors",
                                         metadata)
    if default:
        _DEFAULT_FILES[key] = files
    return files
