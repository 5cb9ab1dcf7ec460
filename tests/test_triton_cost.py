"""The loss's modelled cost (lelp_fast/kernels/triton/cost.py): the bytes one distillation step
moves per element through the launcher, counted on the CPU, against the floor (read s and t once,
write the gradient once, in their dtype). The SASS half of the model (instructions and MUFU per
element) is gated in tests/test_triton_aot.py with the compiled kernels."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported

from lelp_fast.kernels.triton import cost  # noqa: E402
from lelp_fast.ops import _dispatch  # noqa: E402

BACKEND = "cpu" if _dispatch.available("cpu", torch.device("cpu")) else "torch"


def test_budgets_follow_from_the_device_figures():
    """At the bf16 floor (6 B/element) the H200 allows 37 instructions and 4.6 MUFU per element, the
    H100 53 and 6.6: the gates (40, 3) sit at the H200's issue budget and under its MUFU budget."""
    b = cost.budgets(6)
    assert b["H200"]["instructions"] == pytest.approx(36.96) and b["H100"]["instructions"] == pytest.approx(52.96, 1e-3)
    assert b["H200"]["mufu"] == pytest.approx(4.62) and b["H100"]["mufu"] == pytest.approx(6.62, 1e-3)
    assert cost.MAX_MUFU_PER_ELEMENT < b["H200"]["mufu"]


def test_byte_counter_sees_each_pass():
    """The counter is what the gate below rests on: a cast and an in-place scale of an N x K tensor."""
    x = torch.randn(8, 16)
    moved, ops = cost.step_bytes_per_element(lambda: x.mul_(2.0).to(torch.bfloat16), 8, 16)
    assert moved == 4 + 4 + 4 + 2, ops
    out = torch.empty(8, 16, dtype=torch.bfloat16)
    moved, ops = cost.step_bytes_per_element(lambda: torch.mul(x, 2.0, out=out), 8, 16)
    assert moved == 4 + 2, ops


def test_bf16_backward_is_one_pass_into_the_students_dtype():
    """The backward scaled the fp32 gradient in place and then cast it: 22 B/element for bf16 in all.
    Now one pass reads the fp32 gradient and writes bf16: 8 (kernel) + 6."""
    moved, ops = cost.loss_step_bytes(torch.bfloat16, backend=BACKEND)
    assert moved <= 14, ops


@pytest.mark.parametrize("dtype, floor", [(torch.bfloat16, 6), (torch.float32, 12)])
def test_loss_step_moves_only_the_floor_bytes(dtype, floor):
    """The Triton launcher (run by the interpreter here): the kernel writes the gradient once, in the
    student's dtype with τ and the mean folded in, and the backward of ``loss.backward()`` hands it
    on untouched. It took 14 B/element for bf16 and 20 for fp32: an fp32 gradient that the backward
    read once more to scale it (the CPU backend still does, see the test above)."""
    if not _dispatch.available("triton", torch.device("cpu")):
        pytest.skip("the Triton interpreter is not available")
    moved, ops = cost.loss_step_bytes(dtype, backend="triton")
    assert moved <= floor, f"{moved} B/element against the floor's {floor}: {ops}"
