"""Large CPU gradients reuse memory already mapped (issue 21, CPU loss at C = 2 with long class
segments: a fresh 128 MiB gradient's first write was a third of the step), and never overwrite a
gradient that is still alive."""

import threading
import time

import pytest
import torch

from lelp_fast.ops import _reused_buffers, distill_loss
from lelp_fast.ops import _dispatch

BIG = (_reused_buffers.MIN_BYTES // 4 // 64, 64)  # fp32 rows x columns: exactly MIN_BYTES


@pytest.fixture(autouse=True)
def _no_blocks():
    _reused_buffers.release()
    yield
    _reused_buffers.release()


def test_a_freed_block_is_handed_out_again_a_live_one_never():
    a = _reused_buffers.empty(BIG, torch.float32, torch.device("cpu"))
    a.fill_(1.0)
    b = _reused_buffers.empty(BIG, torch.float32, torch.device("cpu"))  # a is alive: another block
    assert b.data_ptr() != a.data_ptr()
    b.fill_(2.0)
    assert float(a.min()) == float(a.max()) == 1.0
    a_ptr = a.data_ptr()
    del a
    c = _reused_buffers.empty(BIG, torch.float32, torch.device("cpu"))
    assert c.data_ptr() == a_ptr and c.data_ptr() % _reused_buffers.ALIGN == 0
    view = c[1:]  # a view keeps the block alive too
    del c
    d = _reused_buffers.empty(BIG, torch.float32, torch.device("cpu"))
    assert d.data_ptr() not in (view.data_ptr() - BIG[1] * 4, b.data_ptr())


def test_small_or_bounded_kept_blocks():
    small = _reused_buffers.empty((3, 5), torch.bfloat16, torch.device("cpu"))
    assert small.shape == (3, 5) and small.dtype == torch.bfloat16 and _reused_buffers.kept_bytes() == 0
    blocks = [_reused_buffers.empty(BIG, torch.float32, torch.device("cpu")) for _ in range(3)]
    assert len({t.data_ptr() for t in blocks}) == 3
    del blocks
    _reused_buffers.empty((BIG[0] * 2, BIG[1]), torch.float32, torch.device("cpu"))
    assert _reused_buffers.kept_bytes() <= 3 * (_reused_buffers.MIN_BYTES + _reused_buffers.ALIGN)
    assert len(_reused_buffers._blocks) <= _reused_buffers.MAX_BLOCKS


def test_unused_blocks_beyond_the_bound_go_on_the_next_call():
    """Four gradients alive at once, then freed: the next call keeps at most MAX_BLOCKS."""
    held = [_reused_buffers.empty(BIG, torch.float32, torch.device("cpu")) for _ in range(4)]
    assert len(_reused_buffers._blocks) == 4
    del held
    again = _reused_buffers.empty(BIG, torch.float32, torch.device("cpu"))
    assert len(_reused_buffers._blocks) == _reused_buffers.MAX_BLOCKS
    assert again.data_ptr() in {b.ctypes.data + (-b.ctypes.data) % 64 for b in _reused_buffers._blocks}


def test_too_large_or_switched_off_is_a_plain_tensor(monkeypatch):
    monkeypatch.setattr(_reused_buffers, "MAX_BLOCK_BYTES", _reused_buffers.MIN_BYTES - 1)
    _reused_buffers.empty(BIG, torch.float32, torch.device("cpu"))
    assert _reused_buffers.kept_bytes() == 0
    monkeypatch.undo()
    monkeypatch.setattr(_reused_buffers, "ENABLED", False)
    _reused_buffers.empty(BIG, torch.float32, torch.device("cpu"))
    assert _reused_buffers.kept_bytes() == 0
    assert _reused_buffers.ENABLED is False and _reused_buffers._counts_hold()  # this Python counts as assumed


def test_concurrent_callers_get_distinct_blocks(monkeypatch):
    """Threads that yield inside the search for an unused block (where a race would be): no two live
    tensors share memory (without the lock, two threads take the same block)."""
    unused = _reused_buffers._unused

    def slow_unused(index):
        answer = unused(index)
        time.sleep(0.001)  # let another thread run between the check and the taking
        return answer

    monkeypatch.setattr(_reused_buffers, "_unused", slow_unused)
    held, barrier = [], threading.Barrier(4)
    _reused_buffers.empty(BIG, torch.float32, torch.device("cpu"))  # one unused block for all to find

    def take():
        barrier.wait()
        held.append(_reused_buffers.empty(BIG, torch.float32, torch.device("cpu")))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({t.data_ptr() for t in held}) == 4


@pytest.mark.skipif(not _dispatch.available("cpu", torch.device("cpu")), reason="needs the compiled CPU extension")
def test_the_cpu_loss_reuses_its_large_gradient_and_keeps_a_held_one_intact():
    n, c, s = _reused_buffers.MIN_BYTES // 4 // 128, 2, 64
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c * s, generator=g).requires_grad_(True)
    log_t = torch.log_softmax(torch.randn(n, c * s, generator=g), -1)
    y = torch.randint(0, c, (n,), generator=g)
    kw = dict(num_classes=c, n_subclasses=s, tau=2.0, alpha=0.1, backend="cpu")
    distill_loss(x, log_t, y, **kw).backward()
    first, ptr = x.grad.clone(), x.grad.data_ptr()
    x.grad = None
    distill_loss(x, log_t, y, **kw).backward()
    assert x.grad.data_ptr() == ptr  # the same pages, written again
    torch.testing.assert_close(x.grad, first, atol=0, rtol=0)
    held = x.grad
    x.grad = None
    distill_loss(x * 2, log_t, y, **kw).backward()  # another gradient while `held` is alive
    assert x.grad.data_ptr() != held.data_ptr()
    torch.testing.assert_close(held, first, atol=0, rtol=0)
