"""The train engine: state, pure steps, parallel strategies, checkpoints, loop and suites."""

from kdjax.train.loop import NonFiniteLoss, Preempted, train_and_evaluate
from kdjax.train.run_dir import ConfigChanged
from kdjax.train.checkpoint import CheckpointError
from kdjax.train.state import TrainState
from kdjax.train.step import make_eval_step, make_train_step
from kdjax.train.suite import run_suite
from kdjax.train.validate import ConfigError, validate_config

__all__ = ["CheckpointError", "ConfigChanged", "NonFiniteLoss", "Preempted", "train_and_evaluate", "TrainState", "make_eval_step",
           "make_train_step", "run_suite", "ConfigError", "validate_config"]
