"""Born-again networks: generations distilled from the previous one (Furlanello et al. 2018).

Generation k+1 is trained, from a fresh initialisation, to match the output distribution of
generation k; the generations are separate suite runs (`kdjax/train/suite.py` expands the suite
row `born_again` into runs `born_again_1 .. born_again_N`, each with its own directory and
checkpoint), and the born-again ensemble averages the probabilities of all N generations.
"""

import ml_collections

from kdjax.methods import base, logit


class BornAgain(logit.KD):
  """One born-again generation: `ce_weight * CE + kd_weight * losses.kd` to the previous one.

  The loss is KD's (`T^2 KL(softmax(t / T) || softmax(s / T))`, per example, averaged over the
  batch); its teacher is the previous generation, which the suite passes as the run's teacher
  checkpoint.

  Defaults: no official code was released, so they follow the paper (Furlanello et al. 2018,
  "Born Again Neural Networks", ICML, Sec. 3): a BAN minimises the cross-entropy between its
  output distribution and the teacher's alone (`ce_weight` 0, `kd_weight` 1), at temperature
  1 (the paper's softmax has none); the cross-entropy to the soft labels differs from the KL
  only by the teacher's entropy, a constant, so the gradients are the same. The paper reports
  up to three generations and their ensembles (`generations` 3).

  Fields:
    generations: in a suite config, how many generations the suite trains (>= 1). In the
      config of one generation's run (its `config.json`), that generation's index k: the run
      then does not depend on how many generations follow, and a longer chain reuses the
      finished ones.

  The teacher of generation 1 is the suite's `teacher` run, i.e. `config.teacher.model`
  trained from scratch: the paper's setting has it the same architecture as the students
  (set `config.teacher.model = config.student.model`); a different one gives the paper's
  cross-architecture BANs (Sec. 4, e.g. DenseNet teacher, ResNet students). Generations 2..N
  are `config.student.model`.
  """
  generations_field = "generations"  # The suite expands the row into chained generations.
  name = "born_again"
  family = "self"
  paper = "Furlanello et al. 2018"
  field_help = {
      "generations": "in a suite, how many generations to train (each the next one's teacher)",
  }

  @classmethod
  def default_config(cls):
    config = super().default_config()  # KD's fields (its `fused` mode too), BAN's values.
    config.update(dict(ce_weight=0.0, kd_weight=1.0, temperature=1.0, generations=3))
    return config

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    base.check_positive_int(config, self.name, "generations")


METHODS = (BornAgain,)
