"""The training engine of METHOD.md section 3: ReCARE (stage 1 + stage 2), its ablations and the ESD baseline.

    params.py             trainable UNet parameters by train_method (a table)
    guidance.py           N(d; p), the ESD target, Eq. 13, the losses of Eqs. 11-12
    rollout.py            the x_t roll-out (50 DDIM steps, k in [1, 48], guidance 3, official timestep)
    esd.py                the ESD loop and the iteration loop stage 2 shares
    stage2.py             the ReCARE loop (teacher predictions in one batched call)
    textual_inversion.py  learning a fresh token against a (erased) model
    export.py             writers of every output format
    determinism.py        deterministic CUDA kernels for a block (bit-identical resume on a GPU)
    recipe.py             the orchestrator: `train(...)` and the job target `run_training_job`

Typical use:

    from recare.config import TrainConfig
    from recare.train import train
    result = train(TrainConfig.for_method("recare", ...), pipe, images, careset, "runs/tench")
"""

from recare.train.esd import ErasureTrainer, ESDTrainer
from recare.train.guidance import esd_target, normalized_direction, recare_erase_target, recare_loss, split_parallel
from recare.train.params import count_trainable, select_trainable, trainable_parameter_names
from recare.train.recipe import TrainResult, job_config, run_training_job, train
from recare.train.rollout import Rollout, XtSampler, encode_prompts
from recare.train.stage2 import Stage2Trainer, balanced_order

__all__ = [
    "ErasureTrainer", "ESDTrainer", "Stage2Trainer", "balanced_order",
    "esd_target", "normalized_direction", "recare_erase_target", "recare_loss", "split_parallel",
    "count_trainable", "select_trainable", "trainable_parameter_names",
    "Rollout", "XtSampler", "encode_prompts",
    "TrainResult", "job_config", "run_training_job", "train",
]
