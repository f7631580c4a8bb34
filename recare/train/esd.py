"""ESD erasure with normalised guidance (stage 1's erase step and the `esd` baseline), and the
iteration loop that stage 2 shares.

Two uses, one loop, different values (`recare.config.ESDConfig`):
* stage 1's erase (official CARE): eta = 2, target eps*(0) ("map the concept to the empty prompt"),
  AdamW with weight decay 1e-2;
* the `esd` baseline, the original ESD (rohitgandikota/erasing `train-esd.py`): target
  e_0 - eta_o (e_c - e_0) with eta_o = 1 (eta = 3 here), Adam (AdamW with weight decay 0), 1000
  iterations at lr 1e-5; ESD-u = noxattn (objects, nudity), ESD-x = xattn (styles). Two details
  differ from the original and are kept as CARE's: x_t is drawn by CARE's roll-out (`rollout.XtSampler`,
  t = 999 - 20k) where the original predicts at a timestep drawn inside [20k, 20k + 20); and the
  parameter sets are CARE's table (`recare.train.params`: Linear/Conv2d only), where the original's
  noxattn also trains norms and leaves the time embedding and the output layers out.

One ESD iteration (official damilab/CARE `train_erasing`):
1. x_t from the roll-out of the model being fine-tuned under the concept c (`rollout.XtSampler`);
2. the frozen model predicts eps*(c) and eps*(0) at (x_t, t): one batched UNet call, no grad;
3. target = eps*(c) - (eta - 1) N(eps*(c) - eps*(0); eps*(c))  (`guidance.esd_target`);
4. the model being fine-tuned predicts eps_theta(c); loss = MSE(eps_theta(c), target); AdamW step.

`ErasureTrainer` holds what every erasure loop needs: the trainable parameters (`params`), AdamW,
the run's explicit CPU generator, the queue of drawn roll-outs, mixed precision, the finite-loss
check, progress events, cancel between iterations, and a resumable `state_dict`.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from recare.config import ESDConfig
from recare.errors import Cancelled, TrainingError
from recare.models.traced_calls import predict_noise
from recare.progress import CancelToken, ProgressCallback, emit
from recare.train.guidance import esd_target, mse
from recare.train.params import select_trainable
from recare.train.rollout import Rollout, XtSampler, autocast_factory, cfg_pair


class ErasureTrainer:
    """Base of the ESD and stage-2 loops: one optimizer step per `step()`, resumable between steps.

    Subclasses say which prompt an iteration rolls out under (`rollout_prompt`) and how its loss is
    made from a roll-out (`losses`).

    Args:
        student: the UNet being fine-tuned (changed in place; `train_method` picks what trains).
        teacher: the frozen UNet whose predictions make the targets (never changed).
        sampler: draws x_t (`XtSampler`).
        embeddings: text embeddings by prompt, (1, 77, D) each, every prompt the loop uses plus "".
        iterations: optimizer steps in this loop.
        learning_rate, weight_decay: AdamW's (other AdamW settings: torch defaults, as official).
        train_method: noxattn / xattn / selfattn / full (`recare.train.params`).
        seed: seeds the loop's CPU generator (roll-out k and noise; stage 2's orders).
        rollout_batch: roll-outs drawn per UNet batch (1 = official; see `XtSampler.sample_batch`).
        amp_dtype: torch.float16 / torch.bfloat16 for autocast on CUDA; None = full precision.
    """

    stage = "erase"

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, sampler: XtSampler,
                 embeddings: dict[str, torch.Tensor], *, iterations: int, learning_rate: float,
                 weight_decay: float = 1e-2, train_method: str = "noxattn", seed: int = 42,
                 rollout_batch: int = 1, amp_dtype: torch.dtype | None = None):
        self.student, self.teacher, self.sampler = student, teacher, sampler
        self.embeddings = embeddings
        self.iterations = int(iterations)
        self.rollout_batch = int(rollout_batch)
        self.device = sampler.device
        self.student.train()   # the teacher is only called under no_grad: its flags stay the caller's
        self.params = select_trainable(student, train_method)
        # fused on CUDA: the same update without foreach's parameter-sized temporaries (measured: benchmarks/gpu_check.py)
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=learning_rate, weight_decay=weight_decay,
                                           fused=True if self.device.type == "cuda" else None)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.autocast = autocast_factory(self.device, amp_dtype)
        # fp16 gradients underflow without loss scaling; bf16 and fp32 need none
        self.scaler = torch.amp.GradScaler(self.device.type) if amp_dtype == torch.float16 else None
        self.done = 0
        self.pending: list[Rollout] = []
        self._empty = embeddings[""]

    # ---- what a subclass defines ---------------------------------------------------------------

    def rollout_prompt(self, i: int) -> str:
        """The prompt iteration i rolls out under."""
        raise NotImplementedError

    def losses(self, i: int, rollout: Rollout) -> dict[str, torch.Tensor]:
        """{"loss": the scalar to minimise, plus named parts such as "erase", "retain"}."""
        raise NotImplementedError

    # ---- the loop ------------------------------------------------------------------------------

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def next_rollout(self, i: int) -> Rollout:
        """Iteration i's x_t; with `rollout_batch` > 1, draws the next few iterations' at once."""
        if not self.pending:
            upcoming = range(i, min(i + self.rollout_batch, self.iterations))
            pairs = [cfg_pair(self._empty, self.embeddings[self.rollout_prompt(j)]) for j in upcoming]
            self.pending = self.sampler.sample_batch(self.student, pairs, self.generator, self.autocast)
        return self.pending.pop(0)

    def predict(self, unet: torch.nn.Module, rollout: Rollout, prompts: list[str]) -> torch.Tensor:
        """Predictions of `unet` for each prompt on x_t at t, as ONE batched call, returned as float32."""
        n, dtype = len(prompts), next(unet.parameters()).dtype   # a half-precision teacher takes half inputs
        latents = rollout.latents.expand(n, -1, -1, -1).to(dtype)
        hidden = torch.cat([self.embeddings[p] for p in prompts]).to(dtype)
        with self.autocast():
            out = predict_noise(unet, latents, rollout.timestep, hidden)
        return out.float()

    def step(self) -> dict[str, float]:
        """One iteration: roll-out, targets, loss, AdamW step. Returns its metrics.

        Raises:
            TrainingError: the loss is NaN or Inf; no weight changed and the loop's draws are rewound,
                so a state saved now is the last good one.
        """
        start = time.perf_counter()
        i = self.done
        generator_state, pending = self.generator.get_state(), list(self.pending)
        rollout = self.next_rollout(i)
        parts = self.losses(i, rollout)
        loss = parts["loss"]
        if not bool(torch.isfinite(loss.detach())):
            self.generator.set_state(generator_state)
            self.pending = pending
            raise TrainingError(
                f"{self.stage}: the loss became {loss.item()} at iteration {i + 1} of {self.iterations}; "
                f"nothing was updated and the last good weights are kept. Lower the learning rate "
                f"(now {self.lr:g}) or train in fp32 (dtype 'fp32')."
            )
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.done += 1
        metrics = {name: float(value.detach()) for name, value in parts.items()}
        metrics.update(lr=self.lr, k=float(rollout.k), t=float(rollout.timestep),
                       seconds=time.perf_counter() - start)
        return metrics

    def run(self, progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
            checkpoint: Callable[[], None] | None = None, save_every: int | None = None,
            message: str = "") -> None:
        """Iterate until `iterations` are done, from wherever the loop stands (0, or a resumed state).

        Args:
            progress: receives one event per iteration: stage, step, total, and the metrics
                loss / erase / retain / lr / k / t / seconds.
            cancel: checked before every iteration; when set, `checkpoint` runs and `Cancelled` is raised.
            checkpoint: saves a resumable state (called every `save_every` iterations and on cancel).
            save_every: iterations between checkpoints (None: only on cancel).
            message: a short line carried by every event ("round 1 of 2").
        """
        while self.done < self.iterations:
            if cancel is not None and cancel.is_set():
                if checkpoint is not None:
                    checkpoint()
                raise Cancelled(f"{self.stage} was cancelled after {self.done} of {self.iterations} iterations")
            metrics = self.step()
            emit(progress, self.stage, self.done, self.iterations, message, **metrics)
            if checkpoint is not None and save_every and self.done % save_every == 0 and self.done < self.iterations:
                checkpoint()

    # ---- resumable state -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to continue bit-identically: trained tensors, AdamW, generator, queue."""
        return {
            "stage": self.stage,
            "done": self.done,
            "params": {name: p.detach().to("cpu", copy=True) for name, p in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "pending": [{"latents": r.latents.cpu(), "k": r.k, "timestep": r.timestep} for r in self.pending],
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`'s output (the student gets the saved trained tensors)."""
        if state.get("stage") != self.stage:
            raise TrainingError(f"the saved state belongs to {state.get('stage')!r}, not {self.stage!r}")
        missing = sorted(set(self.params) - set(state["params"]))
        if missing:
            raise TrainingError(f"the saved state lacks {len(missing)} trained tensors (e.g. {missing[0]}); "
                                "was it made with another train_method?")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state["params"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.pending = [Rollout(r["latents"].to(self.device), int(r["k"]), int(r["timestep"]))
                        for r in state["pending"]]
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.done = int(state["done"])


class ESDTrainer(ErasureTrainer):
    """ESD of one concept c with normalised guidance (`ESDConfig`).

    Args:
        concept: the prompt erased (the reference word, or a previous round's placeholder token).
        config: iterations, learning rate, eta, projection weight w, weight decay.
        Other arguments: see `ErasureTrainer`.
    """

    stage = "esd"

    def __init__(self, student, teacher, sampler, embeddings, concept: str, config: ESDConfig | None = None,
                 *, train_method: str = "noxattn", seed: int = 42, rollout_batch: int = 1,
                 amp_dtype: torch.dtype | None = None, stage: str | None = None):
        self.config = config or ESDConfig()
        self.concept = concept
        if stage is not None:
            self.stage = stage
        if concept not in embeddings or "" not in embeddings:
            raise ValueError("embeddings must hold the concept and the empty prompt")
        super().__init__(student, teacher, sampler, embeddings, iterations=self.config.iterations,
                         learning_rate=self.config.learning_rate, weight_decay=self.config.weight_decay,
                         train_method=train_method, seed=seed, rollout_batch=rollout_batch, amp_dtype=amp_dtype)

    def rollout_prompt(self, i: int) -> str:
        return self.concept

    def losses(self, i: int, rollout: Rollout) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            eps_c, eps_empty = self.predict(self.teacher, rollout, [self.concept, ""]).chunk(2)
            target = esd_target(eps_c, eps_empty, self.config.eta, self.config.projection_weight)
        prediction = self.predict(self.student, rollout, [self.concept])
        loss = mse(prediction, target)
        return {"loss": loss, "erase": loss}
