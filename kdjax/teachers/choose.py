"""Which teacher a run (or a hand-built step) gets, from what its method declares it needs.

`choose_teacher` is the one place that decides the source for a run; `for_method` builds the
`Teacher` of a step from an apply function, for code that builds steps by hand (tests,
benchmarks, notebooks).
"""

from typing import Any, Callable, NamedTuple, Optional, Sequence

from kdjax.models.output import Output
from kdjax.teachers import live, pretrained, process_logits
from kdjax.teachers.teacher import NO_TEACHER, Teacher


def for_method(method, *, teacher_apply=None, student_apply=None,
               num_classes: Optional[int] = None, source: Optional[str] = None) -> Teacher:
  """The `Teacher` that `method`'s train step sees.

  Args:
    method: a `kdjax.methods.base.Method`; its `teacher_needs.kind` decides: 'none' -> no
      teacher; 'self' -> the student's apply function on variables from the method state;
      'one' / 'ensemble' -> `teacher_apply` (an ensemble's apply stacks the logits), or, when
      it is None, outputs carried by the batch only (an on-disk cache).
    teacher_apply: the loaded teacher's apply function, or None.
    student_apply: the student's apply function (for self-teachers).
    num_classes: the number of classes, for top-k caches.
    source: the name of the source (default: from the kind).
  """
  needs = method.teacher_needs
  if needs.kind == "none":
    return NO_TEACHER
  if needs.kind == "self":
    return Teacher(source="self", apply=student_apply,
                   variables_from_state=method.teacher_variables_from_state)
  if teacher_apply is None:
    return Teacher(source=source or "disk_cache", num_classes=num_classes,
                   stacked=needs.ensemble)
  return Teacher(source=source or ("ensemble" if needs.ensemble else "checkpoint"),
                 apply=teacher_apply, stacked=needs.ensemble, num_classes=num_classes)


def for_evaluation(method, *, teacher_apply=None, student_apply=None) -> Teacher:
  """The `Teacher` the eval step compares the student with (agreement, the teacher's own
  accuracy): the method's self-teacher, else the loaded teacher (loaded for evaluation alone
  in language-model runs whose method trains without one), else none."""
  needs = method.teacher_needs
  if needs.kind == "self":
    return for_method(method, student_apply=student_apply)
  if teacher_apply is None:
    return NO_TEACHER
  return Teacher(source="ensemble" if needs.ensemble else "checkpoint", apply=teacher_apply,
                 stacked=needs.ensemble)


class Chosen(NamedTuple):
  """A run's teacher.

  train / eval: the `Teacher` its train step and its eval step see.
  variables: the loaded teacher's variables, host arrays (a list for ensembles; None when no
    checkpoint is loaded).
  sample: the teacher's Output on two sample inputs (for the method's `init`: connectors are
    shaped by the teacher's taps), or None without one.
  """
  train: Teacher
  eval: Teacher
  variables: Any
  sample: Optional[Output]


def choose_teacher(config, method, *, specs: Sequence, checkpoints: Sequence[str], cache,
                   pipeline, sample_inputs, student_apply,
                   model_kwargs: Callable[[str], dict], language_model: bool) -> Chosen:
  """The one place that decides where a run's teacher outputs come from.

  In order of precedence:
  * an on-disk cache (`cache`, opened from `config.teacher.cache` before the pipeline, whose
    batches it joins): the teacher never runs, and the eval step has no teacher;
  * a pretrained Hugging Face-format directory (`config.teacher.pretrained`,
    `kdjax.teachers.pretrained`), for training and evaluation as a checkpoint would be;
  * the checkpoints `checkpoints` (one teacher, or every teacher of an ensemble) when the
    method needs them, or, for language models, for evaluation alone (agreement and
    speculative acceptance against the teacher even for `scratch`); with
    `config.lm.teacher_logits` their logits are computed once per process and carried by the
    batches (`process_logits`), after the method has chosen its training examples (MiniPLM);
  * the student itself on variables in the method state (self-teachers);
  * none.

  Args:
    config: the run's config.
    method: the run's method (its `teacher_needs` decide; `select_examples` runs here).
    specs: the run's teachers (`TeacherSpec`s of its plan), the main one first.
    checkpoints: their checkpoint directories, in the same order.
    cache: the opened `disk_cache.TeacherCache`, or None.
    pipeline: the run's input pipeline.
    sample_inputs: two model inputs (zeros), to shape the teacher's sample outputs.
    student_apply: the student's apply function (self-teachers; MiniPLM's reference).
    model_kwargs: model name -> extra factory arguments (the parallel strategy's).
    language_model: the run trains a language model.
  """
  needs = method.teacher_needs
  if cache is not None:
    return Chosen(train=Teacher(source="disk_cache", num_classes=config.num_classes,
                                stacked=needs.ensemble),
                  eval=NO_TEACHER, variables=None, sample=Output(*cache.sample_outputs(2)))
  teacher_apply, variables, sample = None, None, None
  if pretrained.teacher_directory(config) and (needs.checkpoint or language_model):
    # A Hugging Face-format directory (`config.teacher.pretrained`) instead of checkpoints.
    teacher_apply, variables = pretrained.load_teacher(config)
    sample, _ = teacher_apply(variables, sample_inputs, train=False)
  elif needs.checkpoint or (language_model and checkpoints):
    teacher_apply, variables = live.load_teachers(config, specs, checkpoints, sample_inputs,
                                                  ensemble=needs.ensemble,
                                                  model_kwargs=model_kwargs)
    sample, _ = teacher_apply(variables, sample_inputs, train=False)
  keep = method.select_examples(pipeline, teacher_apply=teacher_apply,
                                teacher_variables=variables, reference_apply=student_apply)
  if keep is not None:
    pipeline.restrict_training(keep)
  attached = language_model and process_logits.attach(
      config, method, pipeline, teacher_apply, variables) is not None
  source = "process_logits" if attached and process_logits.trains_from_cache(needs) else None
  train = for_method(method, teacher_apply=teacher_apply if needs.checkpoint else None,
                     student_apply=student_apply, num_classes=config.num_classes,
                     source=source)
  return Chosen(train=train, eval=for_evaluation(method, teacher_apply=teacher_apply,
                                                 student_apply=student_apply),
                variables=variables, sample=sample)
