"""The teacher as the train and eval steps see it: one object, one question.

`Teacher.outputs(variables, batch)` is "the teacher's outputs (logits and taps) for this
batch", in eval mode and under `stop_gradient`, whatever the source:

* outputs computed ahead of the step and carried by the batch (`keys`: the on-disk cache,
  LM logits computed once per process) are read, and the teacher does not run;
* otherwise `apply` runs on the batch's inputs: a trained checkpoint, an ensemble of them
  (logits stacked on a leading axis), or the student's own apply function (a self-teacher,
  whose variables `variables(...)` reads from the method state: EMA, DINO).

The sources are built in this package (`live`, `disk_cache`, `process_logits`) and chosen
once per run by `choose.choose_teacher` from the run config and the method's `TeacherNeeds`.
"""

import dataclasses
from typing import Any, Callable, Optional

import jax

from kdjax.models.apply import ApplyFn
from kdjax.models.output import Output
from kdjax.teachers import keys

SOURCES = ("none", "checkpoint", "ensemble", "self", "disk_cache", "process_logits")


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A run's teacher.

  Attributes:
    source: where its outputs come from, one of `SOURCES` (for messages and the run summary).
    apply: runs the teacher on any inputs, `apply(variables, inputs, train=False, rng=None)`;
      None where it cannot run (no teacher; an on-disk cache without the model). Methods that
      show the teacher other inputs than the batch's (views, rewritten batches) need it.
    variables_from_state: for a self-teacher, method state -> its variables.
    stacked: the logits are several teachers' stacked on a leading axis [N, ...] (ensembles).
    num_classes: the number of classes, for top-k caches (dense logits are rebuilt from them).
  """
  source: str = "none"
  apply: Optional[ApplyFn] = None
  variables_from_state: Optional[Callable[[Any], Any]] = None
  stacked: bool = False
  num_classes: Optional[int] = None

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ValueError(f"Teacher.source={self.source!r}; valid: {', '.join(SOURCES)}.")

  @property
  def present(self) -> bool:
    return self.source != "none"

  def variables(self, teacher_variables: Any, method_state: Any) -> Any:
    """The variables the teacher runs on: the loaded ones, or a self-teacher's from the
    method state."""
    if self.variables_from_state is not None:
      return self.variables_from_state(method_state)
    return teacher_variables

  def run(self, variables: Any, inputs: jax.Array) -> Output:
    """The teacher's Output on `inputs` (eval mode, no gradient)."""
    if self.apply is None:
      raise ValueError(f"A teacher read from {self.source!r} cannot run on new inputs.")
    output, _ = self.apply(variables, inputs, train=False, rng=None)
    return jax.lax.stop_gradient(output)

  def outputs(self, variables: Any, batch: dict, inputs: jax.Array) -> Optional[Output]:
    """The teacher's Output for `batch` (whose model inputs are `inputs`): read from the batch
    when it carries them, else computed; None without a teacher."""
    if not self.present:
      return None
    carried = keys.outputs_from_batch(batch, num_classes=self.num_classes)
    if carried is not None:
      return jax.lax.stop_gradient(carried)
    return self.run(variables, inputs)


NO_TEACHER = Teacher()
