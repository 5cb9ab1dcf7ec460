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


@pytest.mark.parametrize("subclass_weight", [1.0, 0.1])
@pytest.mark.parametrize("dtype, floor", [(torch.bfloat16, 6), (torch.float32, 12)])
def test_loss_step_moves_only_the_floor_bytes(dtype, floor, subclass_weight):
    """The Triton launcher (run by the interpreter here): the kernel writes the gradient once, in the
    student's dtype with τ and the mean folded in, and the backward of ``loss.backward()`` hands it
    on untouched. It took 14 B/element for bf16 and 20 for fp32: an fp32 gradient that the backward
    read once more to scale it (the CPU backend still does, see the test above). At the default
    subclass weight λ = 0.1 (C = 5) too: it took 82 B/element for bf16 and 80 for fp32 as two calls
    of the λ = 1 kernel with torch's pooling of s and t and its backward."""
    if not _dispatch.available("triton", torch.device("cpu")):
        pytest.skip("the Triton interpreter is not available")
    moved, ops = _interpreted_step_bytes(dtype, subclass_weight)
    assert moved <= floor, f"{moved} B/element against the floor's {floor}: {ops}"


@pytest.mark.parametrize("backend", ["triton", BACKEND])
@pytest.mark.parametrize("dtype, floor", [(torch.bfloat16, 4), (torch.float32, 8)])
def test_forward_only_loss_moves_only_the_read_floor(backend, dtype, floor):
    """Under ``torch.no_grad()`` the launchers move s and t and no gradient through the op's
    boundary: at the floor of an evaluation step. They returned the (folded) gradient all the same:
    6 B/element for bf16 and 12 for fp32 on both. (The counter sees the op's tensors only: that no
    kernel writes one inside is tested in test_ops_loss.py and test_triton.py.)"""
    if backend == "triton":
        if not _dispatch.available("triton", torch.device("cpu")):
            pytest.skip("the Triton interpreter is not available")
        moved, ops = _interpreted_step_bytes(dtype, forward_only=True)
    else:
        moved, ops = cost.loss_step_bytes(dtype, backend=backend, forward_only=True)
    assert moved <= floor, f"{moved} B/element against the floor's {floor}: {ops}"


_STEP = """
import sys, torch
from lelp_fast.kernels.triton import cost
moved, ops = cost.loss_step_bytes(getattr(torch, sys.argv[1]), backend="triton", subclass_weight=float(sys.argv[2]),
                                  forward_only=sys.argv[3] == "True")
print(repr((moved, ops)))
"""


def _interpreted_step_bytes(dtype, subclass_weight=1.0, forward_only=False):
    """``cost.loss_step_bytes`` through the Triton launcher in a fresh process under the interpreter:
    in this one the kernels may have been imported without it (tests/test_triton_aot.py collected
    first in the same session), and then they launch on a driver that a CPU machine lacks."""
    import ast
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    args = [str(dtype).removeprefix("torch."), str(subclass_weight), str(forward_only)]
    done = subprocess.run([sys.executable, "-c", _STEP, *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


def test_targets_map_is_read_once_per_row_tile():
    """The targets' bytes per row at the cost shapes, as launched (``targets.plan``): h once per class
    group (once, but twice at K = 128 in fp32: two programs of 64 columns, the second read counted
    at the HBM as if it missed L2, each reading the head's columns with the head; 16-bit embeddings
    take the whole 16 x 8 grid in one, with given logits since 2026-12-05; fp32 with the head did
    until session 54), the output once, and the map's stored columns over the rows of one tile
    (128; fp32 at 16 columns, 256), fp32 included (its map in bf16 hi + lo parts, 4 B per entry): bf16
    K = 16 576 B a row with the head (16 subclass columns and a head of 8), 384 B with given logits;
    K = 128 3,456 and 3,072 B; K = 40 (5 x 8 on an 8 x 8 grid) 1,152 and 960 B. Until 2026-12-05 the
    padding classes and a 16-column head were read too: 768 B at K = 16 with the head, 1,920 and
    1,536 B at K = 40. Before the persistent kernel each 64-row
    program read the whole map: 1,536 B per row at K = 16, 6,912 B at K = 128 in bf16."""
    from lelp_fast.kernels.triton import targets

    for i, c, s in cost.targets_cost_variants():
        v = targets.VARIANTS[i]
        b = cost.targets_bytes_per_row(v, targets.COST_D, c, s)
        item = cost.DTYPE_BYTES[v["dtype"]]
        groups = 2 if c * s == 128 and v["dtype"] == "fp32" else 1
        assert -(-c // v["constexprs"]["C_BLOCK"]) == groups, v
        assert b["h"] == 768 * item * groups and b["out"] == c * s * 4
        assert b["l2"] == b["h"] + b["logits"] + b["map"] and b["dram"] == b["h"] + b["logits"] + b["out"]
        rows_per_tile = v["constexprs"]["BLOCK_N"]
        assert b["rows_per_map_read"] == rows_per_tile >= 128, (v, b)
        columns = -(-c * s // 8) * 8 + (0 if v["constexprs"]["HAS_LOGITS"] else (8 if c <= 8 else 16) * groups)
        assert b["map"] == 768 * columns * 4 / rows_per_tile, (v, b)
        if v["dtype"] == "bf16":
            want = {16: (576, 384), 128: (3456, 3072), 40: (1152, 960)}[c * s][v["constexprs"]["HAS_LOGITS"]]
            assert b["map"] == want, (v, b)
