"""Dataset statistics: per-source counts and repeats, the bucket histogram (text and PNG)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional

from .buckets import bucket_histogram


def bucket_counts(handle) -> tuple[dict, dict]:
    """(images per bucket, samples per bucket per epoch counting repeats)."""
    dataset = handle.dataset
    images = bucket_histogram(dataset.assignments)
    samples = bucket_histogram(dataset.assignments, [r.repeat for r in dataset.records])
    return images, samples


def mean_ar_error(handle) -> float:
    assignments = handle.dataset.assignments
    return sum(abs(a.ar_error) for a in assignments) / max(len(assignments), 1)


def dataset_summary(handle) -> str:
    dataset = handle.dataset
    records = dataset.records
    per_source = Counter(r.source for r in records)
    repeats = Counter()
    for record in records:
        repeats[record.source] += record.repeat
    total_samples = sum(r.repeat for r in records)
    lines = [f"dataset {handle.name}: {len(records)} images, {total_samples:g} samples per epoch with repeats, "
             f"batch {handle.batch_size}, loss weight {handle.loss_weight}, {handle.buckets.describe()}"
             + (f", {len(handle.validation_records)} held out for validation" if handle.validation_records else "")]
    for source in handle.sources:
        count = per_source.get(source.name, 0)
        lines.append(f"  source {source.name}: {source.describe()}: {count} images, "
                     f"{repeats.get(source.name, 0):g} samples/epoch, loss weight {source.loss_weight}")
    images, samples = bucket_counts(handle)
    lines.append("  bucket (w x h): images / samples per epoch")
    for bucket, count in images.items():
        lines.append(f"    {bucket[0]}x{bucket[1]}: {count} / {samples[bucket]:g}")
    if handle.buckets.enabled:
        lines.append(f"  mean aspect-ratio error (without repeats): {mean_ar_error(handle):.4f}")
    steps = len(handle.sampler.batches(handle.sampler.epoch))
    lines.append(f"  batches per epoch on this process: {steps}")
    return "\n".join(lines)


def save_bucket_histogram(handles, path: str | Path, title: Optional[str] = None) -> Path:
    """A bar chart of samples per epoch in each bucket, one colour per dataset, written to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..training.checkpoints import atomic_write

    buckets = sorted({b for h in handles for b in bucket_counts(h)[1]})
    labels = [f"{w}x{h}" for w, h in buckets]
    figure, axis = plt.subplots(figsize=(max(6.0, 0.45 * len(buckets) + 2), 4.2), dpi=110)
    width = 0.8 / max(len(handles), 1)
    for position, handle in enumerate(handles):
        samples = bucket_counts(handle)[1]
        xs = [i + (position - (len(handles) - 1) / 2) * width for i in range(len(buckets))]
        axis.bar(xs, [samples.get(b, 0) for b in buckets], width=width, label=handle.name)
    axis.set_xticks(range(len(buckets)))
    axis.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    axis.set_xlabel("bucket (width x height)")
    axis.set_ylabel("samples per epoch (repeats included)")
    axis.set_title(title or "aspect-ratio buckets")
    if len(handles) > 1:
        axis.legend()
    figure.tight_layout()
    path = Path(path)
    atomic_write(path, lambda temp: figure.savefig(temp, format="png"))
    plt.close(figure)
    return path
