"""The recipe's searches for adversarial tokens: stage 1's rounds and stage 2's closing search.

`TokenSearch` is a mixin of the recipe (`recare.train.recipe._Recipe`), which supplies the run's config, images,
state folder, probe and loops (`run_loop`, `guard`, `erase_loop`, `small_state`, ...). Kept apart so that each
module stays short; the phases, their resumable states and their seeds are described in `recare.train.recipe`.

    stage1      round r = 0 .. n-1: ESD of the current concept on the UNet as the earlier rounds left it, then a
                search of up to `stage1.max_inversions` textual inversions against it (`search_round`).
    closing     not official (`stage2.closing_rounds`): after stage 2, the attacker's own search against the
                trained UNet; a token that still draws the target joins H and stage 2 goes on.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch

from recare.errors import Cancelled, TrainingError
from recare.progress import ProgressEvent
from recare.train.esd import ESDTrainer
from recare.train.stage1_probe import PROBE_STAGE
from recare.train.state import load_tensors, token_dict, token_of, trained_tensors

STAGE1_ERASE, STAGE1_TI = "stage1.erase", "stage1.textual_inversion"
CLOSING_TI, CLOSING_ERASE = "closing.textual_inversion", "closing.erase"
# the closing search's draws are fresh: its k-th round's a-th inversion uses TI seed + 100 + 10 k + a (stage 1's
# attempts use TI seed + a, a < 9), and the stage-2 iterations after it generator seed + 1000 + k
CLOSING_TI_SEED, CLOSING_TI_SEED_STEP, CLOSING_SEED = 100, 10, 1000
# a closing round stops searching at an inversion that draws the target this often on the trained UNet
CLOSING_EARLY_STOP = 0.25


def round_images(images: Sequence, round_index: int, n_rounds: int) -> list:
    """Round r's slice of the target images, as the official dataset picks it.

    `len(images) // n_rounds` images (at least 1) from position r * that size, wrapping around.

    Args:
        images: every target image, in a fixed order.
        round_index: r.
        n_rounds: stage 1's n_iterations.
    """
    n = len(images)
    per = max(1, n // n_rounds)
    start = (round_index * per) % n
    end = start + per
    return list(images[start:end]) if end <= n else list(images[start:]) + list(images[:end - n])


def round_placeholder(template: str, round_index: int) -> str:
    """Round r's placeholder from the textual-inversion config's: "<v*>" -> "<v1*>", "<v2*>"; "<x>" -> "<x>1"."""
    n = str(round_index + 1)
    return template.replace("*", n + "*", 1) if "*" in template else template + n


class TokenSearch:
    """Stage 1 and the closing search, as methods of the recipe (see the module docstring)."""

    def stage1(self, position: dict | None) -> list:
        """Rounds of ESD erase -> textual inversion; returns the learned tokens.

        Args:
            position: the saved state when resuming inside stage 1, else None.
        """
        s1 = self.config.stage1
        if len(self.images or []) < s1.n_iterations:
            raise TrainingError(f"stage 1 has {s1.n_iterations} rounds but {len(self.images or [])} target images: "
                                "give at least one image per round.")
        tokens = [token_of(t) for t in position["tokens"]] if position else []
        first = position["round"] if position else 0
        student = self.fresh_student()
        erased: dict[int, dict[str, torch.Tensor]] = {}   # round -> trained tensors after its erasure
        for r in range(first, s1.n_iterations):
            resumed = position is not None and r == first
            if resumed and position["phase"] == STAGE1_TI:   # the UNet as this round's erasure left it
                erased[r] = self.state.load(f"erased-{r}.pt")
                load_tensors(student, erased[r])
            else:
                if resumed and r > 0:      # the UNet as the previous round left it
                    erased[r - 1] = self.state.load(f"erased-{r - 1}.pt")
                    load_tensors(student, erased[r - 1])
                self.erase_round(student, r, tokens, erased, resume=resumed)
                erased[r] = trained_tensors(student, self.trained_names)
            erased.pop(r - 1, None)
            search = position if resumed and position["phase"] == STAGE1_TI else None
            tokens.append(self.search_round(student, r, tokens, erased[r], search))
            if r + 1 < s1.n_iterations:   # round r + 1 starts from this round's erased UNet
                self.state.save(self.small_state(STAGE1_ERASE, r + 1, tokens), {},
                                {f"erased-{r}.pt": lambda t=erased[r]: t})
        return tokens

    def erase_round(self, student, r: int, tokens: Sequence, erased: dict, resume: bool) -> None:
        """Round r's ESD: erase the reference word (r = 0) or the previous token from `student`.

        The teacher is the UNet at the round's start (the base for r = 0, else a frozen copy of the
        student as round r - 1 left it), as the official FineTunedModel copies the current UNet.
        """
        s1 = self.config.stage1
        concept = self.config.reference_word if r == 0 else tokens[r - 1].placeholder
        teacher = self.base if r == 0 else self.frozen_copy(student)
        trainer = ESDTrainer(student, teacher, self.sampler(), self.embeddings(tokens[:r], [concept]), concept, s1.esd,
                             stage=STAGE1_ERASE, **self.trainer_kwargs())
        fixed = {f"erased-{r - 1}.pt": lambda t=erased.get(r - 1): t} if r > 0 else {}
        self.begin(f"{STAGE1_ERASE}[{r + 1}]")
        self._student = student
        self.run_loop(trainer, STAGE1_ERASE, r, tokens[:r], fixed,
                      f"round {r + 1} of {s1.n_iterations}: erase {concept!r}", resume)

    def search_round(self, student, r: int, tokens: Sequence, erased_r: dict, position: dict | None):
        """Round r's search: up to `stage1.attempts` textual inversions against the erased `student` (the a-th
        with TI seed + a), each probed, then (`search_original`, when none reached `min_token_strength`) one
        against the original UNet. Returns the one strongest on the original model, stopping at the first that
        reaches `min_token_strength`; with one attempt, or no probe or judge, the first inversion.

        Args:
            position: the saved state when resuming inside this round's inversions, else None.
        """
        s1 = self.config.stage1
        attempt = int(position.get("attempt") or 0) if position else 0
        best = token_of(position["best"]) if position and position.get("best") else None
        ti_state = position.get("ti") if position else None
        while True:
            against = self.base if attempt >= s1.attempts else student   # the last resort: the original UNet
            token = self.inversion(against, tokens[:r], STAGE1_TI, r, round_images(self.images, r, s1.n_iterations),
                                   dataclasses.replace(s1.textual_inversion, seed=s1.textual_inversion.seed + attempt),
                                   {f"erased-{r}.pt": lambda: erased_r}, ti_state_of(ti_state),
                                   {"attempt": attempt, "best": token_dict(best) if best is not None else None})
            ti_state = None
            strength = self.probe_round(student, r, token, attempt) if self._probe is not None else None
            if strength is None:             # nothing to choose with: the inversion in hand is the round's token
                return token
            best = token if strength.kept or best is None else best
            attempt += 1
            if attempt >= s1.max_inversions or (s1.min_token_strength > 0 and strength.joins_h):
                return best

    def inversion(self, unet, known: Sequence, phase: str, round_index: int, images: Sequence, ti,
                  fixed: dict[str, Callable[[], Any]], state, search: dict):
        """A textual inversion of a fresh token (the `len(known)`-th placeholder) against `unet` (stage 1: the
        erased student, or the original UNet for `search_original`; the closing search: the trained UNet) on
        `images` with the TextualInversionConfig `ti`. Each checkpoint saves its state as `phase`/`round_index` with `search`
        (where the round's search stands) and the `fixed` tensors (the UNet the round started from).

        Args:
            known: the tokens learned before it (the text encoder knows them).
            state: the inversion's `TextualInversionState` (`ti_state`): a fresh one, or one to continue (a
                saved inversion, or one stopped at an earlier checkpoint); it records every step.
        """
        from recare.train.textual_inversion import learn_token

        s1 = self.config.stage1
        tokenizer, encoder = self.text_models(known)
        done = list(known)

        def checkpoint() -> None:
            self.state.save(self.small_state(phase, round_index, done, state.state_dict(), **search), {}, fixed)

        def progress(event: ProgressEvent) -> None:
            self.progress(event)
            if event.step % self.config.save_every == 0 and event.step < event.total:
                checkpoint()

        unet.requires_grad_(False)     # textual inversion trains the new row only
        self._student = None           # no previews while the UNet does not change
        checkpoint()                   # the UNet is saved before the long inversion starts
        self.begin(f"{phase}[{round_index + 1}]")
        try:
            with self.autocast():
                return self.guard(phase, checkpoint, lambda: learn_token(
                    (unet, self.pipe.vae, encoder, tokenizer, self.pipe.scheduler), images,
                    placeholder=round_placeholder(s1.textual_inversion.placeholder, len(known)),
                    config=ti, progress=progress, cancel=self.cancel, state=state, stage=phase))
        except Cancelled:
            checkpoint()
            raise

    def probe_round(self, student, r: int, token, attempt: int = 0):
        """How strongly round r's token (inversion `attempt` of the round's search) draws the target on the
        original and on the erased `student`: one metrics line (stage "stage1.probe", step r + 1) and the round's
        entry of the result's "stage1_probe" (the strongest inversion so far, with every inversion under
        "attempts"). Returns the TokenStrength (`kept`: the round's strongest so far), or None without a judge."""
        from recare.train.stage1_probe import record_strength

        s1 = self.config.stage1
        strength = self.probe_token(student, r, token)
        if strength is None:
            return None
        strength = record_strength(self.summary, strength, attempt, s1.min_token_strength)
        self.progress(ProgressEvent(PROBE_STAGE, r + 1, s1.n_iterations,
                                    strength.sentence(s1.max_inversions), strength.metrics()))
        return strength

    def probe_token(self, unet, r: int, token, original_if=None):
        """The probe of the r-th token on the original model and `unet` (a TokenStrength, round r + 1), or None
        without a judge (the first time, a metrics line and the result say why). `original_if`: see
        `Stage1Probe.__call__`."""
        from recare.train.stage1_probe import JudgeUnavailable

        if self._probe is None:
            return None
        self.begin(f"{PROBE_STAGE}[{r + 1}]")
        try:
            with self.autocast():
                return self._probe(r, token, unet, original_if)
        except JudgeUnavailable as e:      # a measurement only: the training goes on, the result says why
            self._probe, self.summary["stage1_probe_skipped"] = None, str(e)
            self.progress(ProgressEvent(PROBE_STAGE, r + 1, r + 1, str(e)))
            return None

    def closing(self, student, tokens: list, position: dict | None) -> list:
        """The closing search (not official; `stage2.closing_rounds`): the attacker's own search against the
        trained UNet. Round k runs up to `closing_attempts` textual inversions of a fresh token against `student`
        on round k's slice of the target images, each probed; the one that draws the target most often on the
        trained UNet is kept. It joins H when it draws the target there at all and on the original model at least
        `stage1.min_token_strength` (stage 1's rule; it is Eq. 13's teacher), and stage 2 goes on for
        `closing_iterations` iterations with the larger H. The first round whose token does not join ends the
        search: the trained UNet passed its own attack. Without a judge each round's first inversion joins.

        Args:
            student: stage 2's trained UNet (changed in place).
            tokens: every token so far; the joined closing tokens are appended.
            position: the saved state when resuming inside the closing search, else None.

        Returns:
            `tokens` with the closing tokens that joined H.
        """
        s1, s2 = self.config.stage1, self.config.stage2
        if s1 is None or s2.closing_rounds == 0:
            return tokens
        first = position["round"] if position else 0
        if position:
            tokens = [token_of(t) for t in position["tokens"]]
        for k in range(first, s2.closing_rounds):
            resumed = position is not None and k == first
            if resumed:     # the trained UNet as it stood before round k
                load_tensors(student, self.state.load(f"closed-{k}.pt"))
            before = trained_tensors(student, self.trained_names)
            fixed = {f"closed-{k}.pt": lambda t=before: t}
            if not (resumed and position["phase"] == CLOSING_ERASE):
                token = self.closing_search(student, k, tokens, fixed, position if resumed else None)
                if token is None:
                    break
                tokens = [*tokens, token]
                self.summary["erase_set"] = [*self.summary["erase_set"], token.placeholder]
                self.state.save(self.small_state(CLOSING_ERASE, k, tokens), {}, fixed)
            self.erase_loop(student, tokens, self.summary["erase_set"], CLOSING_ERASE, k,
                            dataclasses.replace(s2, iterations=s2.closing_iterations),
                            self.config.seed + CLOSING_SEED + k, resume=resumed, fixed=fixed)
            if k + 1 < s2.closing_rounds:
                self.state.save(self.small_state(CLOSING_TI, k + 1, tokens), {},
                                {f"closed-{k + 1}.pt": lambda t=trained_tensors(student, self.trained_names): t})
        return tokens

    def closing_search(self, student, k: int, tokens: Sequence, fixed: dict, position: dict | None):
        """Closing round k's inversions (see `closing`); returns the token that joins H, or None.

        Each inversion is probed at every step of `config.closing_checkpoints` (with `closing_probe_steps`: on
        the way, then continued, bit for bit, to its end), so one inversion gives one candidate per checkpoint;
        the summary's "attempt" counts these probes (inversion a's checkpoint c is probe a x checkpoints + c + 1).
        """
        from recare.train.stage1_probe import closing_needs_original, record_closing

        s1, s2 = self.config.stage1, self.config.stage2
        checkpoints = self.config.closing_checkpoints
        attempt = int(position.get("attempt") or 0) if position else 0
        checkpoint = int(position.get("checkpoint") or 0) if position else 0
        best = token_of(position["best"]) if position and position.get("best") else None
        state = ti_state_of(position.get("ti") if position else None)
        images = round_images(self.images, k, s1.n_iterations)
        while attempt < s2.closing_attempts:
            ti = dataclasses.replace(
                s1.textual_inversion, seed=s1.textual_inversion.seed + CLOSING_TI_SEED + CLOSING_TI_SEED_STEP * k + attempt,
                steps=checkpoints[checkpoint])
            token = self.inversion(student, tokens, CLOSING_TI, k, images, ti, fixed, state,
                                   {"attempt": attempt, "checkpoint": checkpoint,
                                    "best": token_dict(best) if best is not None else None})
            probe = attempt * len(checkpoints) + checkpoint
            strength = self.probe_token(student, len(tokens), token,
                                        closing_needs_original(self.summary, k, probe, CLOSING_EARLY_STOP))
            if strength is None:     # no judge: the round's first inversion joins, as stage 1 keeps every token
                return token
            strength = record_closing(self.summary, k, dataclasses.replace(strength, steps=checkpoints[checkpoint]),
                                      probe, s1.min_token_strength)
            self.progress(ProgressEvent(PROBE_STAGE, len(tokens) + 1, s1.n_iterations + s2.closing_rounds,
                                        strength.closing_sentence(k, s2.closing_attempts, len(checkpoints)),
                                        {**strength.metrics(), "closing": float(k + 1)}))
            best = token if strength.kept or best is None else best
            if strength.joins_h and strength.erased >= CLOSING_EARLY_STOP:
                break
            checkpoint += 1
            if checkpoint == len(checkpoints):      # this inversion is done: the next starts from scratch
                attempt, checkpoint, state = attempt + 1, 0, ti_state_of(None)
        entry = self.summary["closing_probe"][-1]
        return best if entry.get("joins_h") else None


def ti_state_of(saved: dict | None):
    """A textual inversion's state to continue from a saved `state_dict` (a checkpoint's "ti"), or a fresh one."""
    from recare.train.textual_inversion import TextualInversionState

    return TextualInversionState.from_state_dict(saved) if saved else TextualInversionState()
