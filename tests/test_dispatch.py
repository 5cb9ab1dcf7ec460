"""Backend choice (lelp_fast/ops/_dispatch.py): no shape fails under auto.

Every shape goes to a backend that takes it (finally torch), and a Triton launch that fails for
resources on the device falls back to the next backend with one warning naming the shape. Run on
the CPU: the GPU backends' availability and the Triton launchers are stood in for, and the results
of the fallen-back calls are compared with the fp64 reference.
"""

import contextlib
import types
import warnings

import pytest
import torch

from lelp_fast import reference
from lelp_fast.ops import _dispatch, distill_loss, lelp_targets
from lelp_fast.ops import loss as loss_op
from lelp_fast.ops import targets as targets_op
from test_ops_loss import make_inputs, reference_loss_and_grad
from test_ops_targets import fp64_reference, random_map

HAS_CPU = _dispatch.available("cpu", torch.device("cpu"))


def _on_cuda(dtype=torch.float32):
    """What the backend choice reads of a CUDA tensor (its device, dtype and shape), without a GPU."""
    return types.SimpleNamespace(device=torch.device("cuda"), dtype=dtype, shape=(4, 8))


@pytest.fixture
def gpu_backends_built(monkeypatch):
    """As on a GPU machine with Triton and the CUDA kernels built."""
    monkeypatch.setattr(_dispatch, "available", lambda backend, device: True)


@pytest.fixture(autouse=True)
def _fresh_failures(monkeypatch):
    monkeypatch.setattr(_dispatch, "_LAUNCH_FAILURES", {}, raising=False)  # absent before the fallback


@pytest.mark.parametrize("shape, want", [((2, 300), "torch"), ((3, 171), "torch"), ((2, 256), "triton")])
def test_loss_auto_takes_the_first_backend_that_takes_the_shape(gpu_backends_built, shape, want):
    """K = 600 and 513 reached the CUDA kernels, which throw above K = 512, instead of torch."""
    c, s = shape
    assert loss_op._choose_backend("auto", _on_cuda(), _on_cuda(), [], [], c, s) == want


def test_loss_auto_skips_a_shape_whose_launch_failed(gpu_backends_built):
    student = _on_cuda(torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="K = 512"):
        _dispatch.record_launch_failure("triton", loss_op._shape_key(student, 2, 256, []), _out_of_resources())
    assert loss_op._choose_backend("auto", student, _on_cuda(), [], [], 2, 256) == "cuda"
    assert loss_op._choose_backend("auto", _on_cuda(torch.float32), _on_cuda(), [], [], 2, 256) == "triton"


@pytest.mark.parametrize("shape, with_head, want", [((2, 300), False, "torch"), ((8, 64), False, "triton"),
                                                    ((17, 2), True, "cuda"), ((17, 32), True, "torch")])
def test_targets_auto_takes_the_first_backend_that_takes_the_shape(gpu_backends_built, shape, with_head, want):
    """C = 17 with a head: past the Triton head dot (16 classes), within CUDA's K; K = 544 past both."""
    c, s = shape
    logits = None if with_head else _on_cuda()
    assert targets_op._choose_backend("auto", _on_cuda(), logits, c, s, torch.float32) == want


def _out_of_resources():
    from triton.runtime.errors import OutOfResources

    return OutOfResources(237_568, 232_448, "shared memory")


@pytest.fixture
def triton_that_cannot_launch(monkeypatch):
    """auto on CPU tensors tries triton first (as on a GPU), whose launchers raise OutOfResources."""
    pytest.importorskip("triton")
    from lelp_fast.kernels.triton import loss as triton_loss
    from lelp_fast.kernels.triton import targets as triton_targets

    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise _out_of_resources()

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("LELP_FAST_BACKEND", raising=False)
    monkeypatch.setattr(triton_loss, "loss_triton", refuse)
    monkeypatch.setattr(triton_targets, "targets_triton", refuse)
    return calls


def _next_backend(monkeypatch, nxt):
    if nxt == "cpu" and not HAS_CPU:
        pytest.skip("the compiled CPU backend is not built")
    candidates = ("triton", nxt) if nxt != "torch" else ("triton",)
    monkeypatch.setattr(_dispatch, "auto_candidates", lambda device: candidates, raising=False)


def _loss_and_grad(backend):
    student, log_t, labels = make_inputs(29, 5, 8, seed=3)
    x = student.float().requires_grad_(True)
    kw = dict(num_classes=5, n_subclasses=8, tau=1.7, alpha=0.3)
    loss = distill_loss(x, log_t.float(), labels, backend=backend, divergence="js", **kw)
    (grad,) = torch.autograd.grad(loss, x)
    want_loss, want_grad = reference_loss_and_grad(x, log_t.float(), labels, divergence_kind="js", **kw)
    return loss, grad, want_loss, want_grad


@pytest.mark.parametrize("nxt", ["cpu", "torch"])
def test_loss_launch_out_of_resources_falls_back_with_one_warning(monkeypatch, triton_that_cannot_launch, nxt):
    _next_backend(monkeypatch, nxt)
    _loss_falls_back_once("triton", triton_that_cannot_launch)


def _loss_falls_back_once(backend, failed_launches):
    """auto warns once naming the shape, gives the reference's loss and gradient, and the second
    call neither warns nor launches the failing kernel again."""
    with pytest.warns(RuntimeWarning, match=backend + r" kernel cannot launch the loss at K = 40 \(C = 5, S = 8\)"):
        loss, grad, want_loss, want_grad = _loss_and_grad("auto")
    torch.testing.assert_close(loss.double(), want_loss, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad.double(), want_grad, atol=4e-5, rtol=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call: no second warning, no second failed launch
        loss2, grad2, _, _ = _loss_and_grad("auto")
    assert len(failed_launches) == 1
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(grad2, grad)


def test_forced_triton_loss_raises_out_of_resources(triton_that_cannot_launch):
    with pytest.raises(Exception, match="out of resource: shared memory"):
        _loss_and_grad("triton")


@pytest.mark.parametrize("nxt", ["cpu", "torch"])
def test_targets_launch_out_of_resources_falls_back_with_one_warning(monkeypatch, triton_that_cannot_launch, nxt):
    _next_backend(monkeypatch, nxt)
    h, weight, bias, logits = (t.float() for t in random_map(33, 40, 10, 16, False, seed=7))
    want = fp64_reference(h, weight, bias, logits, 10, 16, beta=0.8, tau=1.3)
    with pytest.warns(RuntimeWarning, match=r"cannot launch the targets at K = 160 \(C = 10, S = 16\)"):
        got = lelp_targets(h, weight, bias, 10, 16, teacher_logits=logits, beta=0.8, tau=1.3)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = lelp_targets(h, weight, bias, 10, 16, teacher_logits=logits, beta=0.8, tau=1.3)
    assert len(triton_that_cannot_launch) == 1
    torch.testing.assert_close(again, got)
    with pytest.raises(ValueError, match="launch failed for resources"):  # forced: no silent fallback
        lelp_targets(h, weight, bias, 10, 16, teacher_logits=logits, beta=0.8, tau=1.3, backend="triton")


@pytest.mark.parametrize("backend", ["cuda_emu"])
def test_cuda_launch_out_of_resources_falls_back_with_one_warning(backend, cuda_emulator, monkeypatch):
    """Issue 21 item 2: a CUDA kernel whose launch the device refuses (cudaErrorLaunchOutOfResources,
    as csrc/cuda's launchers report it) raised through the user's step; now, as for Triton, auto
    records it with one warning naming the shape and the call goes to the next backend (torch)."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("cuda loss launch failed: too many resources requested for launch")

    monkeypatch.setattr(cuda_emulator, "loss", refuse)
    monkeypatch.setattr(cuda_emulator, "targets", refuse)
    monkeypatch.setattr(_dispatch, "auto_candidates", lambda device: ("cuda",))  # a GPU without Triton
    monkeypatch.delenv("LELP_FAST_BACKEND", raising=False)
    _loss_falls_back_once("cuda", calls)
    with pytest.raises(ValueError, match="launch failed for resources"):  # forced: no silent fallback
        _loss_and_grad(backend)
    h, weight, bias, logits = (t.float() for t in random_map(33, 40, 10, 16, False, seed=7))
    want = fp64_reference(h, weight, bias, logits, 10, 16, beta=0.8, tau=1.3)
    with pytest.warns(RuntimeWarning, match=r"cuda kernel cannot launch the targets at K = 160"):
        got = lelp_targets(h, weight, bias, 10, 16, teacher_logits=logits, beta=0.8, tau=1.3)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    assert len(calls) == 2


@pytest.mark.parametrize("nxt", ["cpu", "torch"])
def test_subclass_weighted_loss_launch_out_of_resources_falls_back(monkeypatch, triton_that_cannot_launch, nxt):
    """λ ≠ 1 is one Triton launch (C <= 16); when it fails for resources the next backend computes the
    same weighted loss (torch: the fp64-formula path of ``_loss_torch``), not the plain λ = 1 loss."""
    _next_backend(monkeypatch, nxt)
    student, log_t, labels = make_inputs(13, 3, 4, seed=6)
    labels[2] = -100
    x = student.float().requires_grad_(True)
    kw = dict(num_classes=3, n_subclasses=4, tau=1.5, alpha=0.2, subclass_weight=0.1)
    with pytest.warns(RuntimeWarning, match="triton kernel cannot launch the loss at K = 12"):
        loss = distill_loss(x, log_t.float(), labels, backend="auto", **kw)
    (grad,) = torch.autograd.grad(loss, x)
    assert len(triton_that_cannot_launch) == 1
    _check_weighted_mean(loss, grad, x, log_t, labels, 3, 4, tau=1.5, weight=0.1, alpha=0.2)


def _check_weighted_mean(loss, grad, x, log_t, labels, c, s, tau, weight, alpha=0.0):
    """The mean λ-weighted loss and its gradient against the fp64 formula (ignored rows: 0)."""
    ref = x.detach().double().requires_grad_(True)
    rows = reference.subclass_weighted_kl(ref, log_t.float().double(), c, s, tau, weight)
    if alpha:
        rows = rows + alpha * reference.hard_label_rows(ref, labels, c, s)
    want = reference.reduce_rows(torch.where(labels != -100, rows, torch.zeros_like(rows)), labels, -100, "mean")
    (want_grad,) = torch.autograd.grad(want, ref)
    torch.testing.assert_close(loss.double(), want.detach(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad.double(), want_grad, atol=4e-5, rtol=1e-3)


@pytest.mark.skipif(not HAS_CPU, reason="the compiled CPU backend is not built")
def test_failed_weighted_launch_falls_back_past_an_extension_without_the_weight(monkeypatch,
                                                                                 triton_that_cannot_launch):
    """When the λ ≠ 1 one pass fails for resources and the next backend's extension was built before
    it took λ, the call computes the weighted loss by the torch formula. Before, the subclass weight
    went to that extension's loss as a keyword it does not take (a TypeError in the user's step)."""
    _next_backend(monkeypatch, "cpu")
    real = _dispatch.extension()

    def loss_without_weight(*args, **kwargs):
        if "subclass_weight" in kwargs:
            raise TypeError("loss(): incompatible function arguments")
        return real.loss(*args, **kwargs)

    old_build = types.SimpleNamespace(loss=loss_without_weight, loss_subclass_weight=False)
    monkeypatch.setattr(_dispatch, "extension", lambda: old_build)
    student, log_t, labels = make_inputs(11, 4, 3, seed=9)
    x = student.float().requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="λ ≠ 1 in one pass"):
        loss = distill_loss(x, log_t.float(), labels, num_classes=4, n_subclasses=3, tau=1.5, subclass_weight=0.1,
                            backend="auto", check_inputs=False)
    (grad,) = torch.autograd.grad(loss, x)
    _check_weighted_mean(loss, grad, x, log_t, labels, 4, 3, tau=1.5, weight=0.1)


def test_failed_weighted_launch_is_remembered_apart_from_the_plain_one(monkeypatch, triton_that_cannot_launch):
    """The λ ≠ 1 one pass and the λ = 1 kernel are different code (other registers and shared
    memory), remembered apart when a launch fails for resources: after the λ ≠ 1 pass failed, a
    λ = 1 call of that shape still tries Triton, and a λ ≠ 1 call does not retry the pass. Before,
    one key held both, so the λ = 1 kernel went to the next backend untried."""
    _next_backend(monkeypatch, "torch")
    student, log_t, labels = make_inputs(9, 5, 3, seed=8)
    student, log_t = student.float(), log_t.float()
    kw = dict(num_classes=5, n_subclasses=3, tau=1.5)
    with pytest.warns(RuntimeWarning, match="λ ≠ 1 in one pass"):
        distill_loss(student, log_t, labels, backend="auto", subclass_weight=0.1, **kw)
    assert len(triton_that_cannot_launch) == 1
    with pytest.warns(RuntimeWarning, match=r"K = 15 \(C = 5, S = 3\), float32 logits on"):
        distill_loss(student, log_t, labels, backend="auto", subclass_weight=1.0, **kw)
    assert len(triton_that_cannot_launch) == 2
    # λ ≠ 1 again: the one pass is not retried; the call makes the two λ = 1 calls (the full KL, whose
    # launch failed above, and the pooled class KL at K = 5, a shape not tried yet)
    with pytest.warns(RuntimeWarning, match=r"K = 5 \(C = 5, S = 1\)"):
        distill_loss(student, log_t, labels, backend="auto", subclass_weight=0.1, **kw)
    assert len(triton_that_cannot_launch) == 3


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("ON", True), ("yes", True), ("y", True),
                                       ("0", False), ("false", False), ("", False)])
def test_triton_interpreter_flag_read_as_triton_reads_it(monkeypatch, value, on):
    """TRITON_INTERPRET=true (or on, yes, y) runs Triton's interpreter as =1 does; the dispatcher and
    the targets launcher read only "1" (Triton on CPU tensors refused, the autotuner asked to time
    configs on a GPU). Now both read the flag as Triton does."""
    pytest.importorskip("triton")
    from lelp_fast.kernels.triton import targets as triton_targets

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _dispatch.available("triton", torch.device("cpu")) is on
    assert triton_targets._interpreting() is on


def test_launch_device_is_the_tensors_gpu():
    """Triton and the CUDA kernels launch on the current device: a tensor on cuda:1 needs cuda:1 made
    current for its launch (issue 21 item 5: tensors on any device)."""
    on_second = _dispatch.launch_device(types.SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(on_second, torch.cuda.device) and on_second.idx == 1
    assert not isinstance(_dispatch.launch_device(torch.zeros(1)), torch.cuda.device)


@pytest.mark.parametrize("backend", ["cuda_emu"])
def test_every_compiled_launch_runs_on_its_tensors_device(backend, cuda_emulator, monkeypatch):
    """The CUDA kernels' loss and targets run inside launch_device of their tensors (before: on
    whatever device was current)."""
    entered, depth = [], [0]

    @contextlib.contextmanager
    def recording(t):
        entered.append(t.device)
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    def inside(kernel):
        def run(*args, **kwargs):
            assert depth[0] > 0, "a kernel launched outside launch_device"
            return kernel(*args, **kwargs)
        return run

    monkeypatch.setattr(_dispatch, "launch_device", recording)
    monkeypatch.setattr(cuda_emulator, "loss", inside(cuda_emulator.loss))
    monkeypatch.setattr(cuda_emulator, "targets", inside(cuda_emulator.targets))
    _loss_and_grad(backend)
    h, weight, bias, logits = (t.float() for t in random_map(9, 12, 3, 4, False, seed=8))
    lelp_targets(h, weight, bias, 3, 4, teacher_logits=logits, backend=backend)
    assert entered == [torch.device("cpu")] * 2


def _dispatched_ops(fn) -> set:
    """The lelp_fast custom ops that went through torch's dispatcher while ``fn`` ran (the profiler
    records each dispatched op; a call past the dispatcher records none)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("lelp_fast::")}


@pytest.mark.skipif(not HAS_CPU, reason="needs the compiled CPU extension")
def test_eager_calls_skip_the_dispatcher():
    """In eager mode on plain tensors the loss and targets call their custom ops' Python functions
    directly: the dispatcher's layers took 0.05 ms of a small loss step's 0.18 ms on a CPU (issue 21:
    the loss at small K was host-bound on the H200, about 1 ms of Python a step). The
    ops stay for torch.compile and CUDA graphs (tests/test_ops_loss.py and test_ops_targets.py)."""
    student, log_t, labels = make_inputs(64, 2, 8, seed=3)
    x = student.float().requires_grad_(True)

    def step():
        distill_loss(x, log_t.float(), labels, num_classes=2, n_subclasses=8, tau=2.0, alpha=0.1,
                     backend="cpu").backward()
        h, w, b = torch.randn(64, 12), torch.randn(12, 18), torch.randn(18)
        lelp_targets(h, w, b, 2, 8, backend="cpu")

    assert _dispatched_ops(step) == set()


def test_traced_and_wrapped_calls_keep_the_op():
    """``eager`` hands back the op itself wherever the call is seen by something other than eager
    autograd: fake tensors, a dispatch mode, a tensor subclass, a functorch transform."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    op = loss_op._loss_rows
    plain = torch.zeros(2, 3)
    assert _dispatch.eager(op, plain, None, [plain]) is not op
    with FakeTensorMode() as mode:
        assert _dispatch.eager(op, mode.from_tensor(plain)) is op
    with TorchDispatchMode():
        assert _dispatch.eager(op, plain) is op
    assert _dispatch.eager(op, plain, [torch.nn.Parameter(plain)]) is op
    seen = []
    torch.func.vmap(lambda row: seen.append(_dispatch.eager(op, row)) or row)(plain)
    assert seen == [op]
