"""The train engine: state, pure steps, parallel strategies, checkpoints, loop and suites."""

from kdjax.train.loop import NonFiniteLoss, Preempted, train_and_evaluate
from kdjax.train.run_dir import ConfigChanged
from kdjax.train.checkpoint import CheckpointError
from kdjax.train.state import TrainState
from kdjax.train.step import make_eval_step, make_train_step
from kdjax.train.files import DiskFullError
from kdjax.train.suite import SuitePlan, plan_suite, run_suite
from kdjax.train.validate import ConfigError, validate_config
from kdjax.train.workdir import WorkdirError, WorkdirLock, prepare_workdir

__all__ = ["CheckpointError", "ConfigChanged", "ConfigError", "DiskFullError", "NonFiniteLoss",
           "Preempted", "SuitePlan", "TrainState", "WorkdirError", "WorkdirLock", "make_eval_step",
           "make_train_step", "plan_suite", "prepare_workdir", "run_suite",
           "train_and_evaluate", "validate_config"]
