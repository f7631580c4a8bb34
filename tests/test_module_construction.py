"""Modules built in one thread while diffusers loads a model in another get real weights.

Diffusers loads inside accelerate's `init_empty_weights`, which swaps `nn.Module.register_parameter`
for the whole process; before `recare.models.construction`, the oracle built beside a pipeline load
(two evaluation shards, a training job beside a Compare load) came out on the meta device, and a
transformers CLIP failed to load.
"""
from __future__ import annotations

import threading

import pytest
import torch

from recare.miniworld.oracle import load_oracle
from recare.models.encoders import load_encoder
from recare.models.pipelines import load_pipeline
from recare.train.textual_inversion import with_learned_tokens
from tests.helpers_tiny import build_tiny_pipeline, make_tiny_clip, make_tiny_pipeline


def _meta(module: torch.nn.Module) -> list[str]:
    return [name for name, p in module.named_parameters() if p.is_meta]


@pytest.mark.parametrize("build", ["oracle", "learned-token embedding", "transformers CLIP"])
def test_a_module_built_beside_a_diffusers_load_is_not_on_meta(build, tmp_path, monkeypatch):
    import accelerate
    from diffusers import StableDiffusionPipeline

    folder = make_tiny_pipeline(tmp_path / "pipe")
    pipe = build_tiny_pipeline() if build == "learned-token embedding" else None
    clip = make_tiny_clip(tmp_path / "clip") if build == "transformers CLIP" else None
    inside, original = threading.Event(), StableDiffusionPipeline.from_pretrained.__func__

    def slow_empty_weights_load(cls, *args, **kwargs):
        # hold the process-wide patch long enough for the other thread to build its module
        with accelerate.init_empty_weights():
            inside.set()
            threading.Event().wait(0.5)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", classmethod(slow_empty_weights_load))
    loader = threading.Thread(target=load_pipeline, args=(str(folder),), kwargs={"device": "cpu"})
    loader.start()
    assert inside.wait(30)
    if build == "oracle":
        built = load_oracle().net
    elif build == "transformers CLIP":
        built = load_encoder(str(clip), device="cpu").model
    else:
        _, built = with_learned_tokens(pipe.tokenizer, pipe.text_encoder,
                                       {"<v1*>": torch.zeros(pipe.text_encoder.config.hidden_size)})
    loader.join()
    assert _meta(built) == []
