"""One training-config override path (`recare.workflows.training_config`): the CLI's options and the Train
workspace's boxes for the same choices give the same TrainConfig."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from recare import cli, models
from recare.config import TrainConfig
from recare.errors import ConfigError
from recare.workflows import mini_world_task, training_config

PROMPT, WORD, INIT = "a photo of a tench", "tench", "fish"


def _cli_config(task, method, *options):
    args = cli.build_parser().parse_args(["train", "--method", method, *(["--task", task] if task else []), *options])
    return cli._train_config(args, mini_world_task(task) if task else None)


def _app_config(task, method, iterations, lr, stage1_iterations, ti_steps, train_method, seed, num_images):
    from ui.train_tab import NO_TASK, _train_config

    ctx = SimpleNamespace(models=SimpleNamespace(policy=models.LOCAL_USE, device="cpu"))
    return _train_config(ctx, task or NO_TASK, method, PROMPT, WORD, INIT, iterations, lr, stage1_iterations, ti_steps,
                         train_method, seed, num_images, models.MINI_WORLD)


@pytest.mark.parametrize("task, method", [("tench", "recare"), ("tench", "esd"), (None, "recare-no-adv"),
                                          (None, "esd")])
def test_the_cli_and_the_app_give_the_same_config_for_the_same_choices(task, method):
    """The app's boxes always hold every number; the CLI is given the same ones (and the app's device and
    save interval, which the app sets itself)."""
    app = _app_config(task, method, 30, 2e-4, 20, 10, "xattn", 3, 8)
    given = _cli_config(task, method, "--iterations", "30", "--lr", "2e-4", "--stage1-iterations", "20",
                        "--ti-steps", "10", "--train-method", "xattn", "--seed", "3", "--num-images", "8",
                        "--target-prompt", PROMPT, "--reference-word", WORD, "--initializer-token", INIT,
                        "--device", "cpu", "--save-every", str(app.save_every))
    assert given.to_dict() == app.to_dict()
    final = app.stage2 or app.esd
    assert final.iterations == 30 and final.learning_rate == 2e-4 and app.seed == 3 and app.num_images == 8
    if app.stage1 is not None:
        assert app.stage1.esd.iterations == 20 and app.stage1.textual_inversion.steps == 10


def test_step_overrides_by_hand():
    """--iterations sets the final stage and every stage-1 round unless --stage1-iterations is given; --lr the
    final stage only; a task's recommended settings stay where nothing overrides them."""
    preset = TrainConfig.for_method("recare")
    both = training_config(None, "recare", iterations=7, lr=0.5)
    assert both.stage2.iterations == 7 and both.stage1.esd.iterations == 7 and both.stage2.learning_rate == 0.5
    assert both.stage1.esd.learning_rate == preset.stage1.esd.learning_rate
    assert both.stage1.textual_inversion.steps == preset.stage1.textual_inversion.steps
    split = training_config(None, "recare", iterations=7, stage1_iterations=3, ti_steps=4, rollout_batch=2)
    assert (split.stage2.iterations, split.stage1.esd.iterations, split.stage1.textual_inversion.steps,
            split.rollout.batch) == (7, 3, 4, 2)
    esd = training_config(None, "esd", iterations=9, stage1_iterations=3, ti_steps=4, lr=1e-3)
    assert esd.stage1 is None and esd.stage2 is None and (esd.esd.iterations, esd.esd.learning_rate) == (9, 1e-3)
    from recare.workflows import task_train_config

    task = mini_world_task("tench")
    assert training_config(task, "recare").to_dict() == task_train_config(task, "recare").to_dict()
    assert training_config(None, "recare").to_dict() == preset.to_dict()


def test_stage1_token_filter_official_default_world_setting_and_override():
    """Official CARE keeps every stage-1 token (0); the mini world's recommended ReCARE keeps tokens drawing the
    target in >= 50% of the probe's images; --min-token-strength overrides either, bounded like any number."""
    assert TrainConfig.for_method("recare").stage1.min_token_strength == 0.0
    assert training_config(mini_world_task("tench"), "recare").stage1.min_token_strength == 0.5
    assert training_config(mini_world_task("tench"), "recare").stage1.search_original is True
    assert TrainConfig.for_method("recare").stage1.search_original is False     # official: no such inversion
    assert _cli_config("tench", "recare").stage1.min_token_strength == 0.5
    official = _cli_config("tench", "recare", "--min-token-strength", "0", "--no-search-original").stage1
    assert (official.min_token_strength, official.search_original) == (0.0, False)   # every token, as CARE's code
    with pytest.raises(ConfigError, match="search_original needs min_token_strength"):
        _cli_config("tench", "recare", "--min-token-strength", "0")
    assert _cli_config(None, "recare", "--min-token-strength", "0.25").stage1.min_token_strength == 0.25
    assert _cli_config(None, "recare-no-adv", "--min-token-strength", "0.25").stage1 is None
    with pytest.raises(ConfigError, match="min_token_strength"):
        _cli_config(None, "recare", "--min-token-strength", "2")
    searched = _cli_config(None, "recare", "--stage1-attempts", "3", "--search-original", "--min-token-strength", "0.5").stage1
    assert (searched.attempts, searched.search_original, searched.min_token_strength) == (3, True, 0.5)
    with pytest.raises(ConfigError, match="attempts"):
        _cli_config("tench", "recare", "--stage1-attempts", "99")
    for option, value in (("--stage1-attempts", "three"), ("--min-token-strength", "/etc/passwd")):
        with pytest.raises(SystemExit):   # argparse refuses a wrong type before any work starts
            _cli_config("tench", "recare", option, value)


def test_the_earlier_closing_searches_are_options_away():
    """--closing-attempts / --closing-ti-steps / --closing-probe-steps reach the closing searches docs/results.md
    measured on tench before the world's (v3: 3 inversions of 250 steps; v4: 3 of 1000 probed at 250); 0 turns the
    probe on the way off; a probe no shorter than the inversion is refused with the reason."""
    world = _cli_config("tench", "recare")
    assert (world.closing_checkpoints, world.stage2.closing_rounds, world.stage2.closing_attempts) == ((250, 1000), 2, 2)
    v3 = _cli_config("tench", "recare", "--closing-attempts", "3", "--closing-ti-steps", "250",
                     "--closing-probe-steps", "0")
    assert v3.closing_checkpoints == (250,)
    assert v3.to_dict() == {**world.to_dict(), "stage2": {**world.to_dict()["stage2"], "closing_attempts": 3,
                                                          "closing_ti_steps": 250, "closing_probe_steps": None}}
    v4 = _cli_config("tench", "recare", "--closing-attempts", "3")
    assert (v4.closing_checkpoints, v4.stage2.closing_attempts) == ((250, 1000), 3)
    with pytest.raises(ConfigError, match=r"closing_probe_steps \(250\) must be below the closing inversions' 250"):
        _cli_config("tench", "recare", "--closing-ti-steps", "250")
    with pytest.raises(ConfigError, match=r"closing_attempts must be between 1 and"):
        _cli_config("tench", "recare", "--closing-attempts", "99")
