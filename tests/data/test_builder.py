"""Datasets end to end: buckets per batch, exact resume, DDP shards, validation split, masks, key errors."""
from __future__ import annotations

import itertools

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from hcpdiff_like.data.buckets import BucketManager
from hcpdiff_like.data.builder import DataConfigError, build_datasets

SIZES = [(96, 64), (64, 96), (64, 64), (128, 64), (80, 80), (64, 128), (100, 70), (70, 100)]


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed")
    for index, size in enumerate(SIZES * 2):
        Image.effect_noise(size, 50).convert("RGB").save(folder / f"{index:02d}.png")
        (folder / f"{index:02d}.txt").write_text(f"tag{index}, red, blue, green, yellow", encoding="utf-8")
    return folder


def data_cfg(folder, **dataset):
    source = {"_target_": "hcpdiff_like.data.sources.ImageCaptionSource", "img_dir": str(folder),
              "shuffle_tags": True, "keep_tokens": 1, "tag_dropout": 0.2}
    source.update(dataset.pop("source", {}))
    base = {"batch_size": 3, "resolution": 64, "enable_bucket": True, "min_bucket_reso": 32,
            "max_bucket_reso": 128, "bucket_reso_steps": 16, "flip": True, "sources": {"s": source}}
    base.update(dataset)
    return OmegaConf.create({"ds": base})


def build(cfg, **kwargs):
    return build_datasets(cfg, seed=5, show_progress=False, **kwargs)[0]


def test_each_batch_is_one_bucket(mixed_folder):
    handle = build(data_cfg(mixed_folder))
    manager = BucketManager(64, enabled=True, min_size=32, max_size=128, step=16)
    expected = {r.image_path.name: manager.select(*r.size).bucket for r in handle.dataset.records}
    for batch in itertools.islice(handle.forever(), 12):
        _, _, height, width = batch["pixel_values"].shape
        assert batch["target_size"].tolist() == [[height, width]] * len(batch["captions"])
        assert all(torch.equal(t, batch["target_size"][0]) for t in batch["target_size"])
        assert (width, height) in set(expected.values())
        assert all(c.startswith("tag") for c in batch["captions"])
    assert "bucket (w x h)" in handle.summary() and "mean aspect-ratio error" in handle.summary()


def test_exact_resume_same_batches_and_captions(mixed_folder):
    first = build(data_cfg(mixed_folder))
    stream = first.forever()
    seen = [next(stream) for _ in range(7)]  # crosses an epoch boundary (6 batches per epoch)
    first_again = build(data_cfg(mixed_folder))
    stream_again = first_again.forever()
    for _ in range(4):
        next(stream_again)
    state = first_again.state_dict()
    resumed = build(data_cfg(mixed_folder))
    resumed.load_state_dict(state)
    rest = list(itertools.islice(resumed.forever(), 3))
    for expected, got in zip(seen[4:], rest):
        assert expected["captions"] == got["captions"]
        assert torch.equal(expected["pixel_values"], got["pixel_values"])
    assert seen[0]["captions"] != seen[6]["captions"] or not torch.equal(seen[0]["pixel_values"],
                                                                         seen[6]["pixel_values"])


def test_ddp_processes_get_disjoint_batches(mixed_folder):
    shards = [build(data_cfg(mixed_folder), num_processes=2, process_index=r) for r in (0, 1)]
    keys = [[tuple(k) for b in s.sampler.batches(0) for k in b] for s in shards]
    assert len(keys[0]) + len(keys[1]) >= 16 and not set(keys[0]) & set(keys[1])
    assert {k[0] for k in keys[0] + keys[1]} == set(range(16))


def test_validation_split_holds_out_by_seed(mixed_folder):
    handle = build(data_cfg(mixed_folder, validation_split=0.25, validation_seed=11))
    train = {r.image_path for r in handle.dataset.records}
    held = {r.image_path for r in handle.validation_records}
    assert len(train) == 12 and len(held) == 4 and not train & held
    again = build(data_cfg(mixed_folder, validation_split=0.25, validation_seed=11))
    assert held == {r.image_path for r in again.validation_records}
    batches = list(handle.eval_loader(batch_size=2))
    captions = [c for b in batches for c in b["captions"]]
    assert sorted(captions) == sorted(r.caption for r in handle.validation_records)  # no random caption ops
    assert all(c.endswith("red, blue, green, yellow") for c in captions)
    assert [c for b in handle.eval_loader(batch_size=2) for c in b["captions"]] == captions


def test_loss_mask_follows_crop_and_flip(tmp_path):
    image = Image.new("RGB", (64, 64), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 32, 64))
    image.save(tmp_path / "a.png")
    masks = tmp_path / "masks"
    masks.mkdir()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask.save(masks / "a.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "b.png")  # no mask: all ones
    cfg = data_cfg(tmp_path, batch_size=1, enable_bucket=False, source={"mask_dir": str(masks), "repeat": 8})
    handle = build(cfg)
    for batch in itertools.islice(handle.forever(), 16):
        mask_batch, pixels = batch["loss_mask"], batch["pixel_values"]
        assert mask_batch.shape == (1, 1, 64, 64)
        if mask_batch.min() == 1:
            continue
        red = pixels[0, 0] > 0.5
        assert torch.equal(red, mask_batch[0, 0] > 0.5)


def test_loss_weights_and_fixed_resolution(tmp_path, write_image):
    for i in range(3):
        write_image(tmp_path / "a" / f"{i}.png", size=(50, 90))
        write_image(tmp_path / "b" / f"{i}.png", size=(90, 50))
    src = "hcpdiff_like.data.sources.ImageCaptionSource"
    cfg = OmegaConf.create({"ds": {"batch_size": 6, "resolution": [48, 32], "sources": {
        "a": {"_target_": src, "img_dir": str(tmp_path / "a"), "loss_weight": 0.5},
        "b": {"_target_": src, "img_dir": str(tmp_path / "b")}}}})
    batch = next(build(cfg).forever())
    assert batch["pixel_values"].shape == (6, 3, 32, 48)
    assert sorted(batch["loss_weight"].tolist()) == [0.5] * 3 + [1.0] * 3


def test_unknown_keys_are_named(mixed_folder):
    with pytest.raises(DataConfigError, match="data.ds.enable_buckets.*enable_bucket"):
        build(data_cfg(mixed_folder, enable_buckets=True))
    with pytest.raises(DataConfigError, match="data.ds.sources.s.shufle_tags.*shuffle_tags"):
        build(data_cfg(mixed_folder, source={"shufle_tags": True}))
    with pytest.raises(DataConfigError, match="data.ds.sources.s: tag_dropout must be within"):
        build(data_cfg(mixed_folder, source={"tag_dropout": 2}))
    with pytest.raises(DataConfigError, match="cache_latents must be"):
        build(data_cfg(mixed_folder, cache_latents="gpu"))


def test_start_up_validation_names_dataset_key_typos():
    from hcpdiff_like.config.launcher import compose_config
    from hcpdiff_like.config.validation import ConfigError, validate_config

    cfg = compose_config(["cfg=demo", "+data.dataset1.cache_latent=disk"])
    with pytest.raises(ConfigError, match="data.dataset1.cache_latent.*did you mean 'cache_latents'"):
        validate_config(cfg)
    validate_config(compose_config(["cfg=demo", "+data.dataset1.cache_latents=disk"]))


def test_worker_processes_give_the_same_stream(mixed_folder):
    plain = list(itertools.islice(build(data_cfg(mixed_folder)).forever(), 3))
    handle = build(data_cfg(mixed_folder), workers=1)
    with_workers = list(itertools.islice(handle.forever(), 3))
    assert [b["captions"] for b in plain] == [b["captions"] for b in with_workers]
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(plain, with_workers))
    assert handle.stream_loader.persistent_workers and next(iter(handle.loader))["captions"]
