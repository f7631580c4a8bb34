"""recare.workflows.task_train_config: preset, then the world's settings, then the task's own, then explicit fields."""

from __future__ import annotations

from recare.config import TrainConfig
from recare.workflows import task_train_config

TASK = {"name": "van_gogh", "target_prompt": "a painting in the style of van gogh", "reference_word": "van gogh",
        "initializer_token": "art", "prompt_style": "painting"}


def _spec(tasks=None):
    unlearning = {"common": {"num_images": 16},
                  "methods": {"recare": {"stage2": {"iterations": 200, "learning_rate": 5e-5}},
                              "esd": {"esd": {"iterations": 250, "learning_rate": 4e-4}}}}
    if tasks is not None:
        unlearning["tasks"] = tasks
    return {"unlearning": unlearning}


def test_world_settings_then_task_settings_then_fields_win_in_that_order():
    official = TrainConfig.for_method("recare", model="mini-world", target_prompt=TASK["target_prompt"],
                                      reference_word="van gogh")
    world = task_train_config(TASK, "recare", _spec())
    assert world.stage2.learning_rate == 5e-5 and world.stage2.iterations == 200 and world.num_images == 16
    assert world.stage2.retain_weight == official.stage2.retain_weight  # untouched fields keep the official value
    assert world.stage1.textual_inversion.templates == "painting"
    tasks = {"van_gogh": {"common": {"num_images": 12}, "methods": {"recare": {"stage2": {"learning_rate": 2e-4}}}},
             "tench": {"methods": {"recare": {"stage2": {"learning_rate": 9e-5}}}}}
    own = task_train_config(TASK, "recare", _spec(tasks))
    assert own.stage2.learning_rate == 2e-4 and own.stage2.iterations == 200 and own.num_images == 12
    # another method of the same task and the same method of another task keep the world's settings
    assert task_train_config(TASK, "esd", _spec(tasks)).esd.learning_rate == 4e-4
    tench = task_train_config({**TASK, "name": "tench"}, "recare", _spec(tasks))
    assert tench.stage2.learning_rate == 9e-5 and tench.num_images == 16
    explicit = task_train_config(TASK, "recare", _spec(tasks), num_images=4)
    assert explicit.num_images == 4


def test_short_run_overrides_also_cap_the_closing_search():
    from recare.workflows import mini_world_task, training_config

    tench = mini_world_task("tench")
    world = training_config(tench, "recare")
    assert (world.stage2.closing_rounds, world.stage2.closing_ti_steps, world.stage2.closing_iterations) == (2, 1000, 100)
    short = training_config(tench, "recare", iterations=4, ti_steps=3)
    assert (short.stage2.iterations, short.stage2.closing_iterations, short.stage2.closing_ti_steps) == (4, 4, 3)
    assert training_config(tench, "recare", iterations=500, ti_steps=2000).stage2.closing_ti_steps == 1000   # a cap only
    assert training_config(tench, "recare", closing_rounds=0).stage2.closing_rounds == 0
    assert training_config(mini_world_task("van_gogh"), "recare").stage2.closing_rounds == 0   # measured on tench only


def test_a_short_run_drops_a_closing_probe_its_inversions_no_longer_reach():
    from recare.config import Stage2Config
    from recare.workflows import training_config

    stage2 = Stage2Config(closing_rounds=1, closing_probe_steps=250)
    official = training_config(None, "recare", stage2=stage2)
    assert (official.stage2.closing_probe_steps, official.closing_checkpoints) == (250, (250, 3000))
    assert training_config(None, "recare", stage2=stage2, ti_steps=500).closing_checkpoints == (250, 500)
    short = training_config(None, "recare", stage2=stage2, ti_steps=200)
    assert (short.stage2.closing_probe_steps, short.closing_checkpoints) == (None, (200,))
