"""Two generations with different settings at once on one shared pipeline make the images each makes alone.

A diffusers call sets its scheduler's timesteps and its guidance on the pipeline it runs on; Gradio runs
visitors' calls in threads over one cached pipeline, so each call must run on its own scheduler
(`recare.generate.call_pipeline`).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from recare.config import GenerateConfig
from recare.generate import call_pipeline, generate_images
from tests.helpers_tiny import build_tiny_pipeline

A = GenerateConfig(prompt="a photo of a cat", num_images=2, base_seed=3, steps=3, guidance=7.5, batch_size=1)
B = GenerateConfig(prompt="a painting of a dog", num_images=2, base_seed=3, steps=9, guidance=1.0, batch_size=1)


def _pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


def test_two_generations_at_once_match_each_alone():
    pipe = build_tiny_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    alone = {"a": _pixels(generate_images(pipe, A)), "b": _pixels(generate_images(pipe, B))}
    steps_before = pipe.scheduler.num_inference_steps
    for _ in range(3):
        got: dict[str, np.ndarray] = {}
        start = threading.Barrier(2)

        def run(name, config):
            start.wait()
            got[name] = _pixels(generate_images(pipe, config))

        threads = [threading.Thread(target=run, args=("a", A)), threading.Thread(target=run, args=("b", B))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for name in ("a", "b"):
            assert np.abs(got[name] - alone[name]).max() == 0, name
    assert pipe.scheduler.num_inference_steps == steps_before  # the shared pipeline's scheduler was never used


def test_prompt_encoding_from_many_threads_matches_alone():
    """The tokenizer's shared padding state: 40 pairs of concurrent encodings, each equal to its own alone."""
    pipe = build_tiny_pipeline(0)
    prompts = ("a photo of a cat", "a painting of a dog")

    def encode(p, prompt):
        with torch.no_grad():
            return p.encode_prompt(prompt, "cpu", 1, True, None)[0]

    alone = {prompt: encode(pipe, prompt) for prompt in prompts}
    for _ in range(40):
        got: dict[str, torch.Tensor] = {}
        start = threading.Barrier(2)

        def run(prompt):
            call = call_pipeline(pipe)
            start.wait()
            got[prompt] = encode(call, prompt)

        threads = [threading.Thread(target=run, args=(prompt,)) for prompt in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for prompt in prompts:
            assert got[prompt].shape == alone[prompt].shape and torch.equal(got[prompt], alone[prompt]), prompt
