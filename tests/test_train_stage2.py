"""The ESD and stage-2 loops: batched predictions equal the official one-call-per-prompt targets,
only the chosen tensors change, NaN stops before the step, cancel and resume between iterations."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from recare.config import ESDConfig, RolloutConfig, Stage2Config
from recare.errors import Cancelled, TrainingError
from recare.progress import CancelToken
from recare.train.esd import ESDTrainer
from recare.train.guidance import esd_target, recare_erase_target
from recare.train.params import trainable_parameter_names
from recare.train.rollout import XtSampler, encode_prompts
from recare.train.stage2 import Stage2Trainer, balanced_order
from tests.helpers_tiny import build_tiny_pipeline

LATENT = (4, 8, 8)
ROLLOUT = RolloutConfig(steps=10)          # k in [1, 8]: the official code path with fewer UNet calls
H = ["tench", "carp"]
ANCHORS = ["A river", "A lake", "A pond"]
RETAIN = ["A photo of river", "A photo of lake"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def embeddings(pipe):
    return encode_prompts(pipe.tokenizer, pipe.text_encoder, ["", *H, *ANCHORS, *RETAIN])


def make_esd(pipe, embeddings, iterations=4, seed=1, lr=1e-3, **kw):
    student = copy.deepcopy(pipe.unet)
    sampler = XtSampler(pipe.scheduler, LATENT, ROLLOUT)
    return ESDTrainer(student, pipe.unet, sampler, embeddings, "tench",
                      ESDConfig(iterations=iterations, learning_rate=lr, projection_weight=0.7), seed=seed, **kw)


def make_stage2(pipe, embeddings, iterations=4, seed=1, lr=1e-3, **kw):
    student = copy.deepcopy(pipe.unet)
    sampler = XtSampler(pipe.scheduler, LATENT, ROLLOUT)
    return Stage2Trainer(student, pipe.unet, sampler, embeddings, H, ANCHORS, RETAIN,
                         Stage2Config(iterations=iterations, learning_rate=lr, retain_weight=0.5,
                                      projection_weight=0.8),
                         seed=seed, **kw)


def single(unet, rollout, embedding):
    """One official-style prediction: its own UNet call, batch 1."""
    return unet(rollout.latents, rollout.timestep, encoder_hidden_states=embedding).sample


def batch_sizes(module):
    sizes = []
    handle = module.register_forward_pre_hook(lambda m, args, kwargs: sizes.append(args[0].shape[0]), with_kwargs=True)
    return sizes, handle


# ---- balanced orders --------------------------------------------------------------------------

def test_balanced_order_is_balanced_shuffled_and_seeded():
    items = ["a", "b", "c"]
    order = balanced_order(items, 200, torch.Generator().manual_seed(0))
    counts = {i: order.count(i) for i in items}
    assert len(order) == 200 and sorted(counts.values()) == [66, 67, 67]
    assert len(set(order[198:])) == 2                          # the remainder: distinct items
    assert order != sorted(order) and order[:66] != ["a"] * 66
    assert order == balanced_order(items, 200, torch.Generator().manual_seed(0))
    assert order != balanced_order(items, 200, torch.Generator().manual_seed(1))
    assert sorted(balanced_order(items, 2, torch.Generator().manual_seed(0))) in (["a", "b"], ["a", "c"], ["b", "c"])


# ---- ESD ----------------------------------------------------------------------------------------

def test_esd_loss_equals_the_official_unbatched_computation(pipe, embeddings):
    trainer = make_esd(pipe, embeddings)
    rollout = trainer.next_rollout(0)
    got = trainer.losses(0, rollout)["loss"]
    with torch.no_grad():
        eps_c = single(pipe.unet, rollout, embeddings["tench"])
        eps_0 = single(pipe.unet, rollout, embeddings[""])
    target = esd_target(eps_c, eps_0, eta=2.0, weight=0.7).float()
    expected = torch.nn.functional.mse_loss(single(trainer.student, rollout, embeddings["tench"]), target)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-9)


def test_esd_step_changes_only_noxattn_tensors_and_never_the_teacher(pipe, embeddings):
    trainer = make_esd(pipe, embeddings, iterations=2)
    base = {n: p.clone() for n, p in pipe.unet.named_parameters()}
    teacher_sizes, h1 = batch_sizes(pipe.unet)
    events = []
    trainer.run(progress=events.append)
    h1.remove()
    assert teacher_sizes == [2, 2]                      # eps*(c) and eps*(0): one call per iteration
    trained = set(trainable_parameter_names(pipe.unet, "noxattn"))
    changed = {n for n, p in trainer.student.named_parameters() if not torch.equal(p, base[n])}
    assert changed and changed <= trained
    assert not any(".attn2." in n for n in changed)
    assert all(torch.equal(p, base[n]) for n, p in pipe.unet.named_parameters())
    assert [(e.stage, e.step, e.total) for e in events] == [("esd", 1, 2), ("esd", 2, 2)]
    assert {"loss", "erase", "lr", "k", "t", "seconds"} <= set(events[0].metrics)
    assert events[0].metrics["lr"] == 1e-3


# ---- stage 2 ------------------------------------------------------------------------------------

def test_stage2_batches_the_teacher_and_the_student_once_each(pipe, embeddings):
    trainer = make_stage2(pipe, embeddings, iterations=1)
    rollout = trainer.next_rollout(0)
    teacher_sizes, h1 = batch_sizes(pipe.unet)
    student_sizes, h2 = batch_sizes(trainer.student)
    trainer.losses(0, rollout)
    h1.remove(), h2.remove()
    assert teacher_sizes == [1 + len(H) + 2]            # empty, every h in H, anchor, retain: ONE call
    assert student_sizes == [2]                         # eps_theta(h), eps_theta(r): ONE call


def test_stage2_loss_equals_the_official_unbatched_computation(pipe, embeddings):
    trainer = make_stage2(pipe, embeddings)
    for i in range(2):
        rollout = trainer.next_rollout(i)
        h, a, r = trainer.erase_order[i], trainer.anchor_order[i], trainer.retain_order[i]
        got = trainer.losses(i, rollout)
        with torch.no_grad():
            e0 = single(pipe.unet, rollout, embeddings[""])
            eh = [single(pipe.unet, rollout, embeddings[x]) for x in H]
            ea = single(pipe.unet, rollout, embeddings[a])
            er = single(pipe.unet, rollout, embeddings[r])
        target = recare_erase_target(e0, [ea], eh, scale=2.0, weight=0.8).float()
        erase = torch.nn.functional.mse_loss(single(trainer.student, rollout, embeddings[h]), target)
        retain = torch.nn.functional.mse_loss(single(trainer.student, rollout, embeddings[r]), er)
        torch.testing.assert_close(got["erase"], erase, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(got["retain"], retain, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(got["loss"], erase + 0.5 * retain, rtol=1e-4, atol=1e-9)


def test_stage2_orders_cover_h_anchors_and_retain(pipe, embeddings):
    trainer = make_stage2(pipe, embeddings, iterations=6)
    assert sorted(trainer.erase_order) == sorted(H * 3)
    assert sorted(trainer.anchor_order) == sorted(ANCHORS * 2)
    assert sorted(trainer.retain_order) == sorted(RETAIN * 3)
    with pytest.raises(TrainingError, match="one anchor prompt"):
        Stage2Trainer(copy.deepcopy(pipe.unet), pipe.unet, trainer.sampler, embeddings, H, [], RETAIN)


# ---- NaN, cancel, resume -------------------------------------------------------------------------

def test_nan_loss_raises_before_the_step_and_rewinds_the_draws(pipe, embeddings):
    trainer = make_stage2(pipe, embeddings, iterations=3)
    trainer.step()
    before = {n: p.clone() for n, p in trainer.student.named_parameters()}
    generator_state, optimizer_state = trainer.generator.get_state(), copy.deepcopy(trainer.optimizer.state_dict())
    real = trainer.losses
    trainer.losses = lambda i, r: {k: v * float("nan") for k, v in real(i, r).items()}
    with pytest.raises(TrainingError, match="nan at iteration 2 of 3"):
        trainer.step()
    assert trainer.done == 1
    assert all(torch.equal(p, before[n]) for n, p in trainer.student.named_parameters())
    assert torch.equal(trainer.generator.get_state(), generator_state)
    assert trainer.optimizer.state_dict()["state"][0]["step"] == optimizer_state["state"][0]["step"]


def test_cancel_between_iterations_checkpoints_first(pipe, embeddings):
    trainer = make_esd(pipe, embeddings, iterations=5)
    token = CancelToken()
    saved = []
    with pytest.raises(Cancelled, match="after 2 of 5"):
        trainer.run(progress=lambda e: token.cancel() if e.step == 2 else None, cancel=token,
                    checkpoint=lambda: saved.append(trainer.done))
    assert trainer.done == 2 and saved == [2]


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("make,rollout_batch", [(make_esd, 1), (make_stage2, 1), (make_stage2, 3)])
def test_resume_is_bit_identical(pipe, embeddings, make, rollout_batch):
    straight = make(pipe, embeddings, iterations=5, rollout_batch=rollout_batch)
    straight.run()
    first = make(pipe, embeddings, iterations=5, rollout_batch=rollout_batch)
    first.step(), first.step()
    state = roundtrip(first.state_dict())
    if rollout_batch > 1:
        assert len(state["pending"]) == 1             # a drawn roll-out waits in the queue
    resumed = make(pipe, embeddings, iterations=5, rollout_batch=rollout_batch)
    resumed.load_state_dict(state)
    resumed.run()
    for (name, a), b in zip(straight.student.named_parameters(), resumed.student.parameters()):
        assert torch.equal(a, b), name


def test_rollout_batch_keeps_the_draws_of_every_iteration(pipe, embeddings):
    ks = {}
    for batch in (1, 3):
        events = []
        make_stage2(pipe, embeddings, iterations=4, rollout_batch=batch).run(progress=events.append)
        ks[batch] = [e.metrics["k"] for e in events]
    assert ks[1] == ks[3]
