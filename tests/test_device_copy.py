"""Host -> device staging (lelp_fast.io.device_copy): reused buffers, order, one item ahead."""

import pytest
import torch

from lelp_fast.io.device_copy import PinnedStager, stage_ahead


def groups(seed=0):
    """Groups of tensors of growing and shrinking sizes, mixed dtypes, a None and a strided view."""
    g = torch.Generator().manual_seed(seed)
    for i, n in enumerate([5, 40, 17, 300, 1, 64, 299]):
        h = torch.randn(n, 7, generator=g).to([torch.float16, torch.bfloat16, torch.float32][i % 3])
        y = torch.randint(0, 3, (n,), generator=g)
        z = None if i % 2 else torch.randn(2 * n, 3, generator=g)[::2]
        yield i, (h, y, z)


def test_copies_match_and_survive_buffer_reuse():
    stager = PinnedStager("cpu", slots=2)
    kept = [(tensors, stager.copy(tensors).wait()) for _, tensors in groups()]
    for want, got in kept:  # earlier outputs are not views of the reused buffers
        for w, o in zip(want, got):
            assert (w is None and o is None) or (o.dtype == w.dtype and torch.equal(o, w))
    # buffers grow to the largest group and are then reused: once each slot has held the largest,
    # another round allocates nothing
    largest = max((tensors for _, tensors in groups()), key=lambda t: t[0].numel() * t[0].element_size())
    stager.copy(largest).wait()
    warm = stager.allocations
    for _, tensors in groups(3):
        stager.copy(tensors).wait()
    assert stager.allocations == warm < 7


def test_stage_ahead_starts_the_next_copy_before_handing_over_the_current_item():
    pulled = []

    def items():
        for key, tensors in groups(1):
            pulled.append(key)
            yield key, tensors

    seen = []
    for key, tensors in stage_ahead(items(), "cpu"):
        assert pulled[-1] == min(key + 1, 6)  # item key + 1 is already read and copying
        seen.append(key)
        assert torch.equal(tensors[1], dict(groups(1))[key][1])
    assert seen == list(range(7))
    assert list(stage_ahead(iter(()), "cpu")) == []


def test_fewer_than_two_slots_is_refused():
    with pytest.raises(ValueError, match="slots must be >= 2"):
        PinnedStager("cpu", slots=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_staging_uses_pinned_buffers_and_matches():
    stager = PinnedStager("cuda", slots=2)
    outs = [(tensors, stager.copy(tensors).wait()) for _, tensors in groups(2)]
    assert all(b.is_pinned() for b in stager.buffers if b is not None)
    for want, got in outs:
        for w, o in zip(want, got):
            assert (w is None and o is None) or (o.is_cuda and torch.equal(o.cpu(), w))
