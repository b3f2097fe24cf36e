"""Data loading throughput: can the loader keep the GPU fed?

    python tools/bench/data_throughput.py                                  # 48 synthetic JPEGs, 512 buckets
    python tools/bench/data_throughput.py --data-dir /data/my_images --resolution 768 --workers 0 4 8
    python tools/bench/data_throughput.py --images 6 --batches 2 --resolution 64 --workers 0 1   # smoke run

Reports (printed as a table and written as JSON with --out):
  - image scan (the start-up check of every file) in images/s,
  - loader throughput in images/s for each worker count (pixel path: decode, resize, crop, captions),
  - latent-cache build time (memory and disk; VAE of --model, tiny SD1 by default) and the throughput of a
    loader that reads the cache instead of decoding,
  - peak resident memory of this process and of its worker processes.
The cache is encoded on the GPU when there is one (on a CPU it is slow: minutes at 512 px).
Figures depend on the machine; nothing here is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def make_synthetic(folder: Path, count: int, resolution: int, seed: int = 0) -> Path:
    """`count` noisy JPEGs of mixed aspect ratios (0.75x to 2x the resolution) with tag captions."""
    from PIL import Image

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        size = (int(resolution * rng.uniform(0.75, 2.0)), int(resolution * rng.uniform(0.75, 2.0)))
        image = Image.effect_noise(size, 64).convert("RGB")
        image.save(folder / f"{index:05d}.jpg", quality=90)
        (folder / f"{index:05d}.txt").write_text(f"tag{index}, red, blue, outdoors, smile", encoding="utf-8")
    return folder


def data_config(folder: Path, args, cache=False, cache_dir=None):
    from omegaconf import OmegaConf

    return OmegaConf.create({"bench": {
        "batch_size": args.batch_size, "resolution": args.resolution, "enable_bucket": True,
        "min_bucket_reso": max(64, args.resolution // 2), "max_bucket_reso": args.resolution * 2,
        "bucket_reso_steps": 64 if args.resolution >= 256 else 16, "flip": True,
        "cache_latents": cache, "latent_cache_dir": str(cache_dir) if cache_dir else None,
        "sources": {"images": {"_target_": "hcpdiff_like.data.sources.ImageCaptionSource", "img_dir": str(folder),
                               "shuffle_tags": True, "keep_tokens": 1}}}})


def time_loader(handle, batches: int) -> float:
    """Images per second over `batches` batches after one warm-up batch (workers started)."""
    stream = handle.forever()
    next(stream)
    count, started = 0, time.perf_counter()
    for _ in range(batches):
        count += len(next(stream)["captions"])
    return count / max(time.perf_counter() - started, 1e-9)


def peak_memory_mb() -> dict:
    scale = 1024 if sys.platform != "darwin" else 1024 * 1024  # ru_maxrss: KiB on Linux, bytes on macOS
    return {"process_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale,
            "workers_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / scale}


def load_vae(model: str | None, device: str):
    from diffusers import AutoencoderKL

    if model is None:
        from hcpdiff_like.models.tiny import tiny_model_path

        model = str(tiny_model_path("sd1"))
    return AutoencoderKL.from_pretrained(Path(model) / "vae", local_files_only=True).to(device).eval()


def run(args) -> dict:
    import torch

    from hcpdiff_like.data import images as images_module
    from hcpdiff_like.data.builder import build_datasets
    from hcpdiff_like.data.latent_cache import cache_latents

    work = Path(tempfile.mkdtemp(prefix="hcp-data-bench-"))
    folder = Path(args.data_dir) if args.data_dir else make_synthetic(work / "images", args.images, args.resolution)
    results: dict = {"images_dir": str(folder), "resolution": args.resolution, "batch_size": args.batch_size}

    images_module._SCAN_MEMO.clear()
    started = time.perf_counter()
    handle = build_datasets(data_config(folder, args), seed=0, show_progress=False)[0]
    scan_seconds = time.perf_counter() - started
    count = len(handle.dataset.records)
    results.update(images=count, scan_seconds=scan_seconds, scan_images_per_s=count / max(scan_seconds, 1e-9),
                   buckets=len({a.bucket for a in handle.dataset.assignments}))

    results["loader_images_per_s"] = {}
    for workers in args.workers:
        handle = build_datasets(data_config(folder, args), seed=0, workers=workers, show_progress=False)[0]
        results["loader_images_per_s"][str(workers)] = time_loader(handle, args.batches)

    if not args.no_cache:
        device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
        vae = load_vae(args.model, device)
        results["cache_device"] = device
        for mode in ("memory", "disk"):
            handles = build_datasets(data_config(folder, args, mode, work / "latents"), seed=0, show_progress=False)
            started = time.perf_counter()
            cache_latents(handles, vae, device, show_progress=False)
            results[f"cache_{mode}_build_seconds"] = time.perf_counter() - started
        handles = build_datasets(data_config(folder, args, "disk", work / "latents"), seed=0, show_progress=False)
        started = time.perf_counter()
        stats = cache_latents(handles, vae, device, show_progress=False)
        results["cache_disk_reuse_seconds"] = time.perf_counter() - started
        results["cache_disk_reused"] = stats["reused"]
        results["cached_loader_images_per_s"] = time_loader(handles[0], args.batches)
    results["peak_memory"] = peak_memory_mb()
    return results


def print_table(results: dict) -> None:
    print(f"images: {results['images']} in {results['buckets']} buckets, resolution {results['resolution']}, "
          f"batch {results['batch_size']}")
    print(f"  image scan at start-up        {results['scan_images_per_s']:10.1f} images/s")
    for workers, rate in results["loader_images_per_s"].items():
        print(f"  loader, {workers:>2} workers (pixels)   {rate:10.1f} images/s")
    if "cache_memory_build_seconds" in results:
        print(f"  latent cache build, memory    {results['cache_memory_build_seconds']:10.2f} s "
              f"({results['cache_device']})")
        print(f"  latent cache build, disk      {results['cache_disk_build_seconds']:10.2f} s")
        print(f"  latent cache reuse, disk      {results['cache_disk_reuse_seconds']:10.2f} s")
        print(f"  loader on cached latents      {results['cached_loader_images_per_s']:10.1f} images/s")
    memory = results["peak_memory"]
    print(f"  peak memory: {memory['process_mb']:.0f} MB (process), {memory['workers_mb']:.0f} MB (largest worker)")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="a folder of images with .txt captions (default: synthetic)")
    parser.add_argument("--images", type=int, default=48, help="synthetic images to write")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=20, help="batches timed per measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, min(4, os.cpu_count() or 1)])
    parser.add_argument("--model", help="diffusers folder whose vae/ encodes the cache (default: tiny SD1)")
    parser.add_argument("--no-cache", action="store_true", help="skip the latent-cache measurements")
    parser.add_argument("--cpu", action="store_true", help="encode the cache on the CPU even with a GPU")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = run(args)
    print_table(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
