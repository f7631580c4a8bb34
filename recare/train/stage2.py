"""ReCARE stage 2 (Eqs. 11-13) on a fresh copy of the base UNet.

One iteration (official damilab/CARE `robust_erase_for_care`), with h, a, r taken from balanced
shuffled orders of H = {target word, v1*, v2*}, the CARE-set's base prompts (anchors) and its
photo/painting prompts (retain):
1. x_t from the roll-out of the model being fine-tuned under h;
2. the frozen original predicts eps*(0), eps*(h') for every h' in H, eps*(a), eps*(r): ONE batched
   UNet call (the official loop makes one call per prompt, each with its own CFG pair);
3. erase target = Eq. 13 (`guidance.recare_erase_target`, N(d; p) in float64);
4. the model being fine-tuned predicts eps_theta(h) and eps_theta(r): one batched call;
5. L = MSE(eps_theta(h), target) + lambda MSE(eps_theta(r), eps*(r)) (Eqs. 11-12); AdamW step.
"""

from __future__ import annotations

from typing import Sequence

import torch

from recare.config import Stage2Config
from recare.errors import TrainingError
from recare.train.esd import ErasureTrainer
from recare.train.guidance import recare_erase_target, recare_loss
from recare.train.rollout import Rollout


def balanced_order(items: Sequence[str], iterations: int, generator: torch.Generator) -> list[str]:
    """`iterations` picks from `items`, each equally often, shuffled (official balanced lists).

    Official: items repeated iterations // len(items) times and shuffled, then the remainder drawn
    without replacement and appended. Same construction, with the run's explicit generator.

    Args:
        items: the choices (H, anchors or retain prompts).
        iterations: how many picks.
        generator: the run's CPU generator.
    """
    items = list(items)
    if not items:
        raise ValueError("balanced_order needs at least one item")
    repeated = items * (iterations // len(items))
    order = [repeated[j] for j in torch.randperm(len(repeated), generator=generator).tolist()]
    remainder = iterations - len(order)
    if remainder > 0:
        order += [items[j] for j in torch.randperm(len(items), generator=generator)[:remainder].tolist()]
    return order


class Stage2Trainer(ErasureTrainer):
    """The ReCARE loss on the student against the frozen original.

    Args:
        student, teacher, sampler, embeddings: see `ErasureTrainer` (embeddings hold "", every h in
            H, every anchor and every retain prompt).
        erase_concepts: H, the target word first, then the adversarial tokens.
        anchors: the CARE-set's base prompts ("A person", ...), the erase loss's anchors.
        retain_prompts: the CARE-set's photo/painting prompts, the retain loss's prompts.
        config: iterations, lr, lambda, s, w, weight decay.
        train_method, seed, rollout_batch, amp_dtype: see `ErasureTrainer`.

    The three orders are drawn from the run's generator before anything else (anchors, retain, H:
    the official order).
    """

    stage = "stage2"

    def __init__(self, student, teacher, sampler, embeddings, erase_concepts: Sequence[str],
                 anchors: Sequence[str], retain_prompts: Sequence[str], config: Stage2Config | None = None,
                 *, train_method: str = "noxattn", seed: int = 42, rollout_batch: int = 1,
                 amp_dtype: torch.dtype | None = None, stage: str | None = None):
        self.config = config or Stage2Config()
        if stage is not None:     # the closing search's loops report as "closing.erase"
            self.stage = stage
        self.erase_concepts = list(erase_concepts)
        if not self.erase_concepts or not list(anchors) or not list(retain_prompts):
            raise TrainingError("stage 2 needs at least one erase concept, one anchor prompt and one retain prompt "
                                "(is the CARE-set empty?)")
        absent = [p for p in ["", *self.erase_concepts, *anchors, *retain_prompts] if p not in embeddings]
        if absent:
            raise ValueError(f"embeddings lack {absent[:3]}")
        super().__init__(student, teacher, sampler, embeddings, iterations=self.config.iterations,
                         learning_rate=self.config.learning_rate, weight_decay=self.config.weight_decay,
                         train_method=train_method, seed=seed, rollout_batch=rollout_batch, amp_dtype=amp_dtype)
        n = self.iterations
        self.anchor_order = balanced_order(anchors, n, self.generator)
        self.retain_order = balanced_order(retain_prompts, n, self.generator)
        self.erase_order = balanced_order(self.erase_concepts, n, self.generator)

    def rollout_prompt(self, i: int) -> str:
        return self.erase_order[i]

    def teacher_prompts(self, i: int) -> list[str]:
        """The frozen model's batch of iteration i: empty, every h' in H, the anchor, the retain prompt."""
        return ["", *self.erase_concepts, self.anchor_order[i], self.retain_order[i]]

    def losses(self, i: int, rollout: Rollout) -> dict[str, torch.Tensor]:
        h, retain = self.erase_order[i], self.retain_order[i]
        n_h = len(self.erase_concepts)
        with torch.no_grad():
            frozen = self.predict(self.teacher, rollout, self.teacher_prompts(i))
            eps_empty, eps_h, eps_anchor, eps_retain = frozen.split([1, n_h, 1, 1])
            target = recare_erase_target(eps_empty, [eps_anchor], list(eps_h.split(1)),
                                         self.config.guidance_scale, self.config.projection_weight)
        pred_h, pred_retain = self.predict(self.student, rollout, [h, retain]).split(1)
        loss = recare_loss(pred_h, target, pred_retain, eps_retain, self.config.retain_weight)
        return {"loss": loss.total, "erase": loss.erase, "retain": loss.retain}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "orders": {"anchor": self.anchor_order, "retain": self.retain_order,
                                                   "erase": self.erase_order}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        orders = state.get("orders") or {}
        self.anchor_order = list(orders.get("anchor", self.anchor_order))
        self.retain_order = list(orders.get("retain", self.retain_order))
        self.erase_order = list(orders.get("erase", self.erase_order))
