"""The fit across 2 gloo processes equals the single-process fit."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lelp_fast import LELPProjector
from conftest import make_problem

CHUNK_BYTES = 20 * 4 * 90  # 90 rows per chunk: 10 chunks, dealt round-robin to the ranks


def _data():
    h, w, b, y = make_problem(n=900, d=20, num_classes=3, seed=51)
    return (h - h.mean(0)).float(), w, b, y


def _worker(rank, world, init_file, out_dir, method):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        h, w, b, y = _data()
        p = LELPProjector(3, method=method).fit(
            h, y, head_weight=w, head_bias=b, chunk_bytes=CHUNK_BYTES, process_group=dist.group.WORLD
        )
        p.save(os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["exact", "nystrom"])
def test_two_gloo_ranks_match_single_process(tmp_path, method):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), method), nprocs=2, join=True)
    h, w, b, y = _data()
    single = LELPProjector(3, method=method).fit(h, y, head_weight=w, head_bias=b, chunk_bytes=CHUNK_BYTES)
    for rank in range(2):
        got = LELPProjector.load(tmp_path / f"rank{rank}.safetensors")
        torch.testing.assert_close(got.A, single.A, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.e, single.e, atol=1e-6, rtol=0)
        assert torch.equal(got.class_counts, single.class_counts)
