"""benchmarks/profile_step.py: one-line errors, and the attribution of XLA thunks to phases."""

import pytest

from conftest import run_python


@pytest.mark.parametrize("args, expected", [
    (["--variants=baseline,foldd_teacher"], "--variants: 'foldd_teacher' is not a variant"),
    (["--variants=folded_teacher"], "--variants must start with baseline"),
    (["--batch_size=0"], "--batch_size must be a positive integer, got 0."),
])
def test_a_mistake_ends_in_one_error_line_before_any_work(args, expected):
  result = run_python(["-m", "benchmarks.profile_step", "--mode=compare"] + args,
                      check=False, timeout=60)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], lines
  assert result.stdout == ""


# A cut-down compiled HLO of a KD step: names and metadata as XLA:CPU prints them.
_HLO = """\
%fused_computation.8 (param_0.13: f32[64,8,8,2], param_1.13: f32[8,8,2,64]) -> f32[64,3,3,64] {
  %param_0.13 = f32[64,8,8,2]{3,2,1,0} parameter(0)
  ROOT %convolution.9 = f32[64,3,3,64]{3,2,1,0} convolution(%param_0.13, %param_1.13), window={size=8x8}
}

%fused_computation.2 (param_0: f32[16]) -> f32[16] {
  %param_0 = f32[16]{0} parameter(0)
  ROOT %mul.1 = f32[16]{0} multiply(%param_0, %param_0), metadata={op_name="jit(train_step)/transpose(jvp(CifarResNet))/stem_bn/mul"}
}

ENTRY %main.137 (state_step.1: s32[], /*index=5*/p: f32[16]) -> f32[16] {
  %conv_general_dilated.44 = f32[2,32,32,16]{3,2,1,0} convolution(%a, %b), metadata={op_name="jit(train_step)/jvp(CifarResNet)/stem_conv/conv_general_dilated"}
  %conv_general_dilated.3 = f32[2,32,32,16]{3,2,1,0} convolution(%a, %c), metadata={op_name="jit(train_step)/CifarResNet/stem_conv/conv_general_dilated"}
  %ynn_fusion.8 = f32[64,3,3,64]{3,2,1,0} fusion(%x, %y), kind=kCustom, calls=%fused_computation.8
  %multiply_fusion = f32[16]{0} fusion(%p), kind=kLoop, calls=%fused_computation.2
  ROOT %add.5 = f32[16]{0} add(%p, %p), metadata={op_name="jit(train_step)/add"}
}
"""


def test_thunks_are_attributed_to_phase_and_kind():
  from benchmarks import profile_step
  instructions = profile_step._parse_hlo(_HLO)
  assert instructions["mul.1"]["computation"] == "fused_computation.2"
  assert instructions["add.5"]["computation"] == "main.137"
  expected = {"conv_general_dilated.44": ("student fwd", "conv"),
              "conv_general_dilated.3": ("teacher fwd", "conv"),
              "ynn_fusion.8": ("student bwd", "conv"),  # A weight gradient: no op name.
              "multiply_fusion": ("student bwd", "batchnorm"),
              "add.5": ("loss+update", "elementwise/other")}
  assert {n: profile_step._classify(n, instructions) for n in expected} == expected
