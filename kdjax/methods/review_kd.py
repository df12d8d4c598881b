"""ReviewKD: knowledge review with ABF fusion and HCL (Chen et al., CVPR 2021).

The student's taps (shallow to deep; the last one usually the pooled embedding, a 1x1 map) are
fused from the deepest to the shallowest by attention-based fusion (ABF) modules, owned and
trained by the method, and each fused map is compared with the teacher's tap of the same stage
by `losses.hcl` (hierarchical context loss). As in the official CIFAR code
(dvlab-research/ReviewKD `CIFAR-100/model/reviewkd.py`@6607308a, mdistiller
`mdistiller/distillers/ReviewKD.py`@e8c5bb33), with `n` taps and `k = n-1, ..., 0`:

  x_k  = BN(conv1x1(student_k))                               [B, H_k, W_k, mid]
  if k < n-1 (fuse): y = nearest_resize(r_{k+1}, (H_k, W_k))
                     a = sigmoid(conv1x1_bias([x_k, y]))       [B, H_k, W_k, 2]
                     x_k = x_k * a[..., 0] + y * a[..., 1]
  r_k  = nearest_resize(x_k, teacher_k's (H, W)) if the sizes differ, else x_k
  out_k = BN(conv3x3(r_k))                                     [B, H_t, W_t, C_t]

`mid = min(max_mid_channels, C_s of the deepest student tap)` (the official `min(512,
in_channels[-1])`); `r_k` is the residual handed to the next, shallower stage. Resizing is
PyTorch's `F.interpolate(mode='nearest')` (source index `floor(i * in / out)`). A `[B, C]`
embedding tap is a 1x1 map. For resnet8x4 (student) -> resnet32x4 (teacher) on the default
taps: student maps 32x32x64, 16x16x128, 8x8x256 and the 1x1x256 embedding; outputs in the
teacher's shapes 32x32x64, 16x16x128, 8x8x256, 1x1x256; mid 256; 1,808,774 ABF parameters.

Taps (defaults as the official CIFAR code): the student's post-ReLU stages and its embedding
(mdistiller `STU_PREACT: False`), the teacher's *pre-ReLU* stages and its embedding
(`preact=True`, `t_features[1:]`).

BatchNorm in the ABFs runs in training mode (batch statistics), over the selected rows of the
global batch (`ops.gather` and a masked BatchNorm, as `kdjax.methods.ofd`): padding rows do
not shift the statistics and N devices give the numbers of one. The running averages are kept
in the method state (`state['batch_stats']`), checkpointed; no loss reads them.

Warm-up: the review term is scaled by `min(step / warmup_steps, 1)` (linear in optimizer steps;
0 disables the warm-up). mdistiller scales by `min(epoch / 20, 1)` with epochs counted from 1
(a staircase; the official script counts from 0): 20 epochs of CIFAR-100 at batch size 64 are
`20 * ceil(50000 / 64) = 15640` steps, the default here.
"""

from typing import Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from kdjax.losses.review import hcl
from kdjax.methods import base, feature
from kdjax.methods.ofd import statistics_mask

# kaiming_uniform_(a=1) (gain 1): U(-sqrt(3 / fan_in), sqrt(3 / fan_in)).
_kaiming_uniform_a1 = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
# PyTorch's default Conv2d init, kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_default_bias(fan_in: int):
  bound = 1.0 / fan_in ** 0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                  bound)


def resize_nearest(x: jax.Array, size: Tuple[int, int]) -> jax.Array:
  """`[B, H, W, C]` -> `[B, size[0], size[1], C]`, PyTorch's `F.interpolate(mode='nearest')`."""
  (_, h, w, _), (out_h, out_w) = x.shape, size
  rows = (jnp.arange(out_h) * h) // out_h
  cols = (jnp.arange(out_w) * w) // out_w
  return x[:, rows][:, :, cols]


def _batch_norm(name: str):
  # torch BatchNorm2d defaults: momentum 0.1 (flax 0.9), eps 1e-5; training mode.
  return nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5,
                      use_fast_variance=False, name=name)


class ABF(nn.Module):
  """One attention-based fusion stage (see the module docstring for the shapes)."""
  mid_channels: int
  out_channels: int
  fuse: bool

  @nn.compact
  def __call__(self, x, residual, out_size, mask):
    mask = mask.reshape(-1, 1, 1, 1)
    x = nn.Conv(self.mid_channels, (1, 1), use_bias=False, kernel_init=_kaiming_uniform_a1,
                name="conv1")(x)
    x = _batch_norm("bn1")(x, mask=mask)
    if self.fuse:
      y = resize_nearest(residual, x.shape[1:3])
      fan_in = 2 * self.mid_channels
      attention = nn.sigmoid(nn.Conv(2, (1, 1), kernel_init=_torch_default_kernel,
                                     bias_init=_torch_default_bias(fan_in),
                                     name="att_conv")(jnp.concatenate([x, y], axis=-1)))
      x = x * attention[..., 0:1] + y * attention[..., 1:2]
    if tuple(x.shape[1:3]) != tuple(out_size):
      x = resize_nearest(x, out_size)
    out = nn.Conv(self.out_channels, (3, 3), padding=[(1, 1), (1, 1)], use_bias=False,
                  kernel_init=_kaiming_uniform_a1, name="conv2")(x)
    return _batch_norm("bn2")(out, mask=mask), x


class ReviewFusion(nn.Module):
  """The ABF stack: student maps (shallow to deep) -> fused maps in the teacher's shapes.

  Attributes:
    mid_channels: the ABFs' inner width.
    out_channels: the teacher taps' channels, shallow to deep.
    out_sizes: the teacher taps' (H, W), shallow to deep.
  """
  mid_channels: int
  out_channels: Sequence[int]
  out_sizes: Sequence[Tuple[int, int]]

  @nn.compact
  def __call__(self, student_maps, mask):
    n = len(student_maps)
    outputs, residual = [None] * n, None
    for k in reversed(range(n)):
      abf = ABF(self.mid_channels, self.out_channels[k], fuse=k < n - 1, name=f"abf{k}")
      outputs[k], residual = abf(student_maps[k], residual, tuple(self.out_sizes[k]), mask)
    return outputs


def _as_map(x):
  return x[:, None, None, :] if x.ndim == 2 else x


class ReviewKD(base.Method):
  """`ce_weight * CE + kd_weight * KD + feature_weight * min(step / warmup_steps, 1) * HCL`.

  HCL is the batch mean of `losses.hcl` summed over the tap pairs. Defaults: mdistiller's
  CIFAR-100 recipe (`configs/cifar100/reviewkd.yaml`@e8c5bb33: `REVIEWKD_WEIGHT` 5.0,
  `CE_WEIGHT` 1.0, `WARMUP_EPOCHS` 20, `MAX_MID_CHANNEL` 512). The official
  `CIFAR-100/script/reviewKD.sh`@6607308a uses the same 5.0 for resnet32x4 -> resnet8x4 and
  the WRN pairs, 8.0 for ShuffleNetV2, 0.6 for resnet56 -> resnet20, 1.0 for resnet110 ->
  resnet32; its `--use-kl` adds KD (here `kd_weight`).
  """
  name = "review_kd"
  family = "feature"
  paper = "Chen et al. 2021"
  field_help = {
      "max_mid_channels": "upper bound on the ABF fusion width",
      "warmup_steps": "steps over which the HCL term ramps from 0 to 1",
  }
  non_negative_fields = ("ce_weight", "kd_weight", "feature_weight")
  positive_fields = ("temperature",)

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(
        ce_weight=1.0, kd_weight=0.0, temperature=4.0, feature_weight=5.0, warmup_steps=15640,
        max_mid_channels=512, student_tap="stage1,stage2,stage3,embedding",
        teacher_tap="stage1_preact,stage2_preact,stage3_preact,embedding"))

  def __init__(self, config):
    super().__init__(config)
    warmup = config.warmup_steps
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
      raise ValueError(f"config.review_kd.warmup_steps must be an integer >= 0 (0: no "
                       f"warm-up), got {warmup!r}.")
    base.check_positive_int(config, self.name, "max_mid_channels")
    self.student_taps = feature._names(config.student_tap)  # pylint: disable=protected-access
    self.teacher_taps = feature._names(config.teacher_tap)  # pylint: disable=protected-access
    if not self.student_taps or len(self.student_taps) != len(self.teacher_taps):
      raise ValueError(
          f"config.review_kd.student_tap={config.student_tap!r} and "
          f"config.review_kd.teacher_tap={config.teacher_tap!r} must name the same number (at "
          "least one) of comma-separated taps, shallow to deep, paired in order.")

  def _maps(self, batch):
    """The student and teacher taps as [b, H, W, C] maps, shallow to deep, shapes checked."""
    students, teachers = [], []
    for s_tap, t_tap in zip(self.student_taps, self.teacher_taps):
      s = feature.feature_tap(batch.student, s_tap, "config.review_kd.student_tap", "student")
      t = feature.feature_tap(batch.teacher, t_tap, "config.review_kd.teacher_tap", "teacher")
      if s.ndim not in (2, 4) or t.ndim not in (2, 4) or s.shape[0] != t.shape[0]:
        raise ValueError(
            f"config.review_kd.student_tap={s_tap!r} has shape {tuple(s.shape)} and "
            f"config.review_kd.teacher_tap={t_tap!r} has shape {tuple(t.shape)}: the ABF "
            "connectors take [B, H, W, C] maps or [B, C] embeddings (1x1 maps) with the same "
            "batch size; they resize any spatial size to the teacher's and map the channels.")
      students.append(_as_map(s))
      teachers.append(_as_map(t))
    return students, teachers

  def fusion(self, students, teachers) -> ReviewFusion:
    mid = min(self.config.max_mid_channels, students[-1].shape[-1])
    return ReviewFusion(mid, tuple(t.shape[-1] for t in teachers),
                        tuple(tuple(t.shape[1:3]) for t in teachers))

  def init(self, rng, sample):
    students, teachers = self._maps(sample)
    students = [jnp.zeros(s.shape, jnp.float32) for s in students]
    variables = self.fusion(students, teachers).init(rng, students,
                                                     jnp.ones(students[0].shape[:1], bool))
    return variables["params"], {"batch_stats": variables["batch_stats"]}

  def warmup(self, step) -> jax.Array:
    if not self.config.warmup_steps:
      return jnp.ones((), jnp.float32)
    return jnp.minimum(jnp.asarray(step, jnp.float32) / self.config.warmup_steps, 1.0)

  def loss(self, params, state, batch, ops):
    c = self.config
    students, teachers = self._maps(batch)
    # The ABFs' BatchNorms need the global batch; so does everything after them.
    where = ops.gather(batch.where).astype(bool)
    students = [base.mask_rows(ops.gather(s).astype(jnp.float32), where) for s in students]
    teachers = [ops.gather(t) for t in teachers]
    fused, updates = self.fusion(students, teachers).apply(
        {"params": params, "batch_stats": state["batch_stats"]}, students,
        statistics_mask(where), mutable=["batch_stats"])
    per_example = hcl(fused, teachers, where=where)
    review = jnp.sum(per_example) / jnp.maximum(jnp.sum(where), 1)
    warmup = self.warmup(batch.step)
    loss, metrics = base.ce_term_and_kd(
        batch, ops, c, {"review_kd": (c.feature_weight * warmup, review)},
        extra_metrics={"review_kd_warmup": warmup})
    return loss, metrics, dict(state, batch_stats=updates["batch_stats"])


METHODS = (ReviewKD,)
