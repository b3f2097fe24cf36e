"""model.cache_text_embeddings: the same conditioning as encoding every time, each caption encoded once,
and only when nothing in the text path trains."""
from __future__ import annotations

import torch

from hcpdiff_like.config.launcher import compose_config
from hcpdiff_like.models.conditioning import TextConditioner
from hcpdiff_like.models.loading import load_model_bundle
from hcpdiff_like.training.text_cache import TextEmbeddingCache


class CountingConditioner(TextConditioner):
    encoded: list

    def forward(self, captions, size_info=None):
        self.encoded.extend(captions)
        return super().forward(captions, size_info)


def test_cached_equals_direct_and_encodes_each_caption_once(tiny_sdxl):
    conditioner = CountingConditioner(load_model_bundle(str(tiny_sdxl)))
    conditioner.encoded = []
    messages = []
    cache = TextEmbeddingCache(max_entries=3, log=messages.append)
    sizes = torch.tensor([[96.0, 80.0, 16.0, 8.0, 64.0, 64.0], [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    with torch.no_grad():
        for captions in (["a", "b"], ["b", "a"], ["a", "c"]):
            hidden, added = cache(conditioner, captions, sizes)
            direct_hidden, direct_added = TextConditioner.forward(conditioner, captions, sizes)
            torch.testing.assert_close(hidden, direct_hidden)
            torch.testing.assert_close(added["text_embeds"], direct_added["text_embeds"])
            torch.testing.assert_close(added["time_ids"], sizes)
    assert [c for c in conditioner.encoded if c in "abc"][:3] == ["a", "b", "c"]  # misses only
    assert cache.hits == 3 and cache.misses == 3 and not messages
    with torch.no_grad():
        cache(conditioner, ["d"], sizes[:1])  # over max_entries: still right, not stored, reported once
    assert "d" not in cache.entries and len(messages) == 1


def test_trainer_caches_only_with_a_frozen_text_encoder(tmp_path, demo_images, tiny_sd1):
    from hcpdiff_like.training.trainer import Trainer

    common = ["cfg=demo", f"data.dataset1.sources.shapes.img_dir={demo_images}", "logger=[console]",
              "model.cache_text_embeddings=true", "train.train_steps=1"]
    trainer = Trainer(compose_config(common), exp_dir=str(tmp_path / "a")).setup()
    assert isinstance(trainer.model.text_cache, TextEmbeddingCache)
    batch = next(iter(trainer.datasets[0].forever()))
    assert trainer.train_step([batch]) > 0
    assert set(trainer.model.text_cache.entries) == set(batch["captions"])
    trainer.cleanup()
    with_te = Trainer(compose_config(common + ["plugin=lora_unet_te"]), exp_dir=str(tmp_path / "b")).setup()
    assert with_te.model.text_cache is None
    with_te.cleanup()
