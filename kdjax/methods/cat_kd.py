"""CAT-KD: class attention transfer (Guo et al., "Class Attention Transfer Based Knowledge
Distillation", CVPR 2023).

`ce_weight * CE + kd_weight * KD(T) + feature_weight * losses.cat_kd` between the class
activation maps (CAMs, `[B, H, W, K]`) of teacher and student, average-pooled to
`resolution` x `resolution`.

Where the CAMs come from. A CAM is the last feature map passed through the classifier's
weights as a 1x1 convolution. For the teacher this is its own classifier: the kernel
`[C_t, K]` of `teacher_variables['params'][teacher_classifier]` (the models' `'head'`),
without the bias, as the official conversion of the teacher (`if_test: True`: `fc.weight` is
copied into the bias-free 1x1 `conv_test`; GzyAftermath/CAT-KD `tools/train.py` and
`mdistiller/models/cifar/resnet.py` @ `2657a68`). The official CIFAR student is rebuilt the
same way (`resnet8x4_test`: its logits are the average-pooled output of a bias-free 1x1 conv,
so that conv is both its classifier and its CAM map). A kdjax method cannot rewrite the
student, whose linear head on the pooled embedding it does not see, so the student's CAMs
come from a method-owned bias-free 1x1 conv `cam_head` (`C_s -> K`, in the method's params)
trained by this term, while CE trains the student's own head. The transfer is the same kind
of object (a linear map of the last features at each position, pooled and matched); the
difference is that the official student's CAM conv is also the one CE trains.

Defaults: the official CIFAR-100 config resnet32x4 -> resnet8x4
(`configs/cifar100/CAT_KD/res32x4_res8x4.yaml` @ `2657a68`: `CAT_loss_weight` 15,
`CAM_RESOLUTION` 2, `IF_NORMALIZE: False`, CE 1, no KD); resnet56 -> resnet20 uses 0.7.
"""

import flax.linen as nn

from kdjax import validation
from kdjax.losses.class_attention import cat_kd
from kdjax.methods import base, feature


class CATKD(feature.FeatureMethod):
  """Class attention transfer on the last feature maps (`stage3` of the CIFAR ResNets)."""
  name = "cat_kd"
  family = "feature"
  paper = "Guo et al. 2023"
  field_help = {
      "resolution": "side of the pooled class activation maps",
      "normalize": "l2-normalise each CAM before the MSE",
      "teacher_classifier": "name of the teacher's classifier in its params (its CAM weights)",
  }
  default_student_tap = "stage3"
  default_teacher_tap = "stage3"
  default_feature_weight = 15.0

  @classmethod
  def extra_config(cls):
    return dict(resolution=2, normalize=False, teacher_classifier="head")

  def __init__(self, config):
    super().__init__(config)
    base.check_positive_int(config, self.name, "resolution")
    if not isinstance(config.normalize, bool):
      raise validation.ConfigError(
          f"config.cat_kd.normalize must be True or False, got {config.normalize!r}.")
    if len(self.student_taps) != 1:
      raise validation.ConfigError(
          f"config.cat_kd.student_tap={config.student_tap!r}: CAT-KD transfers the class "
          "activation maps of one tap pair (the last feature maps).")

  def check_pair(self, student_tap, teacher_tap, student_shape, teacher_shape):
    smallest = min(list(student_shape[1:3]) + list(teacher_shape[1:3]))
    if len(student_shape) != 4 or len(teacher_shape) != 4 or self.config.resolution > smallest:
      raise ValueError(
          f"config.cat_kd.student_tap={student_tap!r} has shape {tuple(student_shape)} and "
          f"config.cat_kd.teacher_tap={teacher_tap!r} has shape {tuple(teacher_shape)}: CAT-KD "
          "needs the last feature maps [B, H, W, C] of both models, each at least "
          f"config.cat_kd.resolution={self.config.resolution} wide.")

  def teacher_kernel(self, batch: base.Batch, channels: int):
    """The teacher classifier's kernel `[C_t, K]`, or a ValueError saying what is missing."""
    c = self.config
    if batch.teacher_variables is None:
      raise ValueError("cat_kd builds the teacher's class activation maps from its classifier "
                       "weights and needs the teacher's variables (Batch.teacher_variables); a "
                       "teacher given as cached outputs cannot be used.")
    params = batch.teacher_variables.get("params", {})
    if c.teacher_classifier not in params or "kernel" not in params[c.teacher_classifier]:
      raise ValueError(f"config.cat_kd.teacher_classifier={c.teacher_classifier!r}: the teacher "
                       "has no such dense layer; its top-level parameters: "
                       f"{', '.join(sorted(params))}.")
    kernel = params[c.teacher_classifier]["kernel"]
    num_classes = batch.student.logits.shape[-1]
    if kernel.ndim != 2 or kernel.shape != (channels, num_classes):
      raise ValueError(
          f"config.cat_kd.teacher_classifier={c.teacher_classifier!r} has a kernel of shape "
          f"{tuple(kernel.shape)}, but config.cat_kd.teacher_tap={c.teacher_tap!r} has "
          f"{channels} channels and the student {num_classes} classes: it must be "
          f"({channels}, {num_classes}); pick the tap the classifier reads (the last feature "
          "map).")
    return kernel

  def init(self, rng, sample):
    super().init(rng, sample)
    (_, _, student, teacher), = self._pairs(sample)
    if sample.teacher_variables is not None:  # Without them, the loss is where it fails.
      self.teacher_kernel(sample, teacher.shape[-1])
    num_classes = sample.student.logits.shape[-1]
    return {"cam_head": nn.Dense(num_classes, use_bias=False).init(rng, student)["params"]}, {}

  def term(self, params, pairs, batch, ops):
    (_, _, student, teacher), = pairs
    kernel = self.teacher_kernel(batch, teacher.shape[-1])
    # Padding rows may hold NaN/inf: zeroed before the 1x1 convs (the loss ignores them).
    teacher_cams = base.mask_rows(teacher, batch.where).astype(kernel.dtype) @ kernel
    student_cams = nn.Dense(kernel.shape[-1], use_bias=False).apply(
        {"params": params["cam_head"]}, base.mask_rows(student, batch.where))
    per_example = cat_kd(student_cams, teacher_cams, resolution=self.config.resolution,
                         normalize=self.config.normalize, where=batch.where)
    return ops.mean(per_example, batch.where)


METHODS = (CATKD,)
