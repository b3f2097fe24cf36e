"""SDXL training speed on a GPU: the full-size architecture from the published config shipped in the
package (random weights, nothing downloaded) at 1024 px, bf16, LoRA rank 32 on the UNet, batch sizes 1-8,
through the framework and through a minimal diffusers + PEFT loop: it/s, images/s, peak GPU memory, MFU.

    python tools/bench/gpu_sdxl.py                                   # batch 1,2,4,8; framework + reference
    python tools/bench/gpu_sdxl.py --batch-sizes 4 --lever-sweep all # each speed lever alone vs the baseline
    python tools/bench/gpu_sdxl.py --compile --cache-latents --json sdxl.json
    python tools/bench/gpu_sdxl.py --device cpu --tiny --batch-sizes 1 --steps 1 --warmup 1   # CPU smoke test

It refuses to run without CUDA unless given --device cpu --tiny. MFU counts every FLOP of one step
(VAE encode, both text encoders, UNet forward + backward) with torch.utils.flop_counter.FlopCounterMode.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_common  # noqa: E402

SPEC = gpu_common.ModelSpec(config_name="sdxl", family="sdxl", resolution=1024, title="SDXL")


def main(argv=None) -> dict:
    return gpu_common.main(SPEC, argv, __doc__, "tools/bench/gpu_sdxl.py")


if __name__ == "__main__":
    main()
