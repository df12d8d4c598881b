"""The 2-D ('data', 'model') strategy gives the single-device numbers: 3 KD train steps of a
small LM pair and a small ViT pair on 8 forced host devices as data=2 x model=4 (teacher split
on 'model'; with jit_2d_fsdp the student too) against 1 device under plain jit; and each device
holds about a quarter of the teacher's parameter bytes (`tests/train/model_parallel_steps.py`)."""

import json

import numpy as np
import pytest

from conftest import run_python


def _run(kind, mesh, devices, pairs="lm,vit"):
  result = run_python(["tests/train/model_parallel_steps.py", kind, mesh, pairs],
                      env_extra={"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"},
                      timeout=1800)
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reference():
  return _run("jit", "", 1)


def _assert_same_numbers(result, reference, pair):
  np.testing.assert_allclose(result["losses"], reference["losses"], rtol=1e-4, err_msg=pair)
  assert reference["losses"][2] < reference["losses"][0], pair  # It trains at all.
  for name, value in reference["eval"].items():
    np.testing.assert_allclose(result["eval"][name], value, rtol=1e-4, err_msg=f"{pair} {name}")
  np.testing.assert_allclose(result["student_checksum"], reference["student_checksum"],
                             rtol=1e-5, err_msg=pair)


@pytest.mark.slow
def test_teacher_split_on_model_axis_gives_single_device_losses(reference):
  sharded = _run("jit_2d", "data=2,model=4", 8)
  for pair in ("lm", "vit"):
    _assert_same_numbers(sharded[pair], reference[pair], pair)
    per_device = sharded[pair]["teacher_bytes_per_device"]
    assert len(per_device) == 8
    # The student stays replicated under jit_2d.
    assert sharded[pair]["student_bytes_per_device"] == [sharded[pair]["student_bytes"]] * 8
  # LM: every matrix split 4 ways, only RMSNorm scales replicated.
  lm = sharded["lm"]
  assert max(lm["teacher_bytes_per_device"]) / lm["teacher_bytes"] == pytest.approx(0.25,
                                                                                     abs=0.01)
  # ViT: its patch and position embeddings stay whole (about a tenth of this small teacher).
  vit = sharded["vit"]
  assert max(vit["teacher_bytes_per_device"]) / vit["teacher_bytes"] < 0.36


@pytest.mark.slow
def test_student_split_too_gives_single_device_losses(reference):
  sharded = _run("jit_2d_fsdp", "data=2,model=4", 8, pairs="lm")["lm"]
  _assert_same_numbers(sharded, reference["lm"], "lm")
  assert max(sharded["student_bytes_per_device"]) / sharded["student_bytes"] < 0.3
