"""Feature methods with global-batch machinery train 3 steps on a CIFAR ResNet pair (resnet56
-> resnet20, the recipe's hyper-parameters) with the same losses on 1 device and on 8 forced
host devices under jit and pmap: FitNet's ConvReg BatchNorm (pmap axis), CRD's memory banks and
other-class negatives, OFD's and ReviewKD's masked BatchNorm over the gathered batch. (The
relational losses of sp, rkd and pkt are checked against one device by simulated pmap in the
method tests; per-example terms need no more than `ops.mean`.)"""

import json

import numpy as np
import pytest

from conftest import run_python

FEATURE_METHODS = "fitnet,crd,ofd,review_kd"


def _losses(parallel, devices):
  result = run_python(["tests/train/multidevice_methods.py", parallel, FEATURE_METHODS],
                      env_extra={"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"},
                      timeout=1800)
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_feature_methods_give_the_single_device_losses_on_eight_devices():
  reference = _losses("jit", 1)
  for parallel in ("jit", "pmap"):
    eight = _losses(parallel, 8)
    for method, losses in reference.items():
      assert all(np.isfinite(losses)), method
      np.testing.assert_allclose(eight[method], losses, rtol=2e-4, err_msg=f"{method} {parallel}")
