"""The CUDA kernels' bodies run on the host (tests/cuda_emu, see conftest.py) at every launch shape.

tests/test_ops_loss.py and tests/test_ops_targets.py run their reference cases on the "cuda_emu"
backend too; these add the shapes that pick each kernel variant: every (lanes per row, chunks per
lane) of the loss, and both sides of the targets tile's width limit. ThreadSanitizer and
AddressSanitizer then run the same bodies to find shared-memory accesses that no barrier orders
and out-of-bounds accesses.
"""

import subprocess

import pytest
import torch
from conftest import build_emulation

from lelp_fast import reference
from lelp_fast.ops import _dispatch, distill_loss, lelp_targets

pytestmark = pytest.mark.skipif(not _dispatch.available("cpu", torch.device("cpu")), reason="needs the extension")
BF16 = 2  # csrc/include/lelp/row_math.h: enum DType


@pytest.mark.parametrize("backend", ["cuda_emu"])
@pytest.mark.parametrize("num_classes,s", [(3, 1), (2, 4), (3, 4), (2, 12), (2, 32), (4, 25), (2, 100), (2, 128),
                                           (5, 80)])
@pytest.mark.parametrize("divergence", ["kl", "js", "mse"])
def test_loss_at_every_lane_layout(backend, num_classes, s, divergence):
    """K = 3 ... 400: one lane per row up to 32 lanes with 1, 2 and 4 chunks each; odd K loads by element."""
    g = torch.Generator().manual_seed(num_classes * 1000 + s)
    n, k = 45, num_classes * s
    student = (torch.randn(n, k, generator=g) * 3).requires_grad_(True)
    log_t = torch.log_softmax(torch.randn(n, k, generator=g) * 3, dim=-1)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    labels[5] = -100
    kw = dict(num_classes=num_classes, n_subclasses=s, tau=2.0, alpha=0.1, divergence=divergence, reduction="none")
    loss = distill_loss(student, log_t, labels, backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), student)
    s64 = student.detach().double().requires_grad_(True)
    want = reference.distillation_loss(s64, log_t.double(), labels, divergence_kind=divergence,
                                       **{key: v for key, v in kw.items() if key != "divergence"})
    (want_grad,) = torch.autograd.grad(want.sum(), s64)
    torch.testing.assert_close(loss.double(), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad.double(), want_grad, atol=2e-5, rtol=1e-4)
    assert loss[5].item() == 0.0 and torch.equal(grad[5], torch.zeros(k))


@pytest.mark.parametrize("backend", ["cuda_emu"])
@pytest.mark.parametrize("num_classes,s,tile", [(2, 127, True), (2, 128, False), (16, 8, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_targets_tile_width_limit(backend, cuda_emulator, num_classes, s, tile, dtype):
    """J = 256 is the widest map the tensor-core tile takes (bf16/fp16 with a split map, fp32 as split
    TF32); J = 258 goes to the row kernel."""
    k = num_classes * s
    j = k + num_classes
    assert cuda_emulator.tile_takes(BF16, j, num_classes, s) == tile
    g = torch.Generator().manual_seed(k)
    n, d = 70, 48
    h = torch.randn(n, d, generator=g).to(dtype)
    weight, bias = torch.randn(d, j, generator=g) / d**0.5, torch.randn(j, generator=g)
    got = lelp_targets(h, weight, bias, num_classes, s, beta=0.5, tau=1.5, backend=backend)
    proj = h.double() @ weight.double() + bias.double()
    want = reference.log_targets(proj[:, :k], proj[:, k:], s, 0.5, 1.5)
    torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4)


SANITIZERS = {
    # a missing __syncwarp/__syncthreads in any kernel body is a reported data race
    "thread": ["-fsanitize=thread"],
    # an out-of-bounds read or write of global or shared memory (compute-sanitizer memcheck's job)
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"],
}


@pytest.mark.parametrize("sanitizer", sorted(SANITIZERS))
def test_kernel_bodies_under_sanitizers(sanitizer):
    """tests/cuda_emu/race_check.cpp runs every kernel variant under ThreadSanitizer (removing one
    barrier makes it fail) and AddressSanitizer (an off-by-one store past a row makes it fail)."""
    try:
        binary = build_emulation("race_check.cpp", f"race_check_{sanitizer}", ["-O1", "-g", *SANITIZERS[sanitizer]])
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"no {sanitizer} sanitizer build here: {exc.stderr.decode()[-300:]}")
    if binary is None:
        pytest.skip("needs g++")
    out = subprocess.run([binary], capture_output=True, text=True, timeout=300)
    assert "Sanitizer" not in out.stderr and "runtime error" not in out.stderr, out.stderr[-4000:]
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr[-2000:]
