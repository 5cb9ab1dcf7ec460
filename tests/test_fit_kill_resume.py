"""A fit killed with SIGKILL and resumed ends with the same bytes as an uninterrupted one."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

from lelp_fast import LELPProjector

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from lelp_fast import LELPProjector
    from slow_source import SlowSource

    g = torch.Generator().manual_seed(0)
    h = torch.randn(3000, 16, generator=g)
    y = torch.randint(0, 2, (3000,), generator=g)
    LELPProjector(3, method=sys.argv[2]).fit(SlowSource(h, y, delay=0.15), chunk_bytes=16 * 4 * 100,
                                             checkpoint=sys.argv[1], checkpoint_every=2, resume=True)
    """
)


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3000, 16, generator=g), torch.randint(0, 2, (3000,), generator=g)


def test_sigkill_then_resume(tmp_path):
    for method in ("exact", "nystrom"):
        ckpt = str(tmp_path / f"{method}.ckpt")
        here = os.path.dirname(os.path.abspath(__file__))  # not the source tree: use the installed package
        proc = subprocess.Popen([sys.executable, "-c", SCRIPT, ckpt, method], cwd=here)
        deadline = time.time() + 60
        while not os.path.exists(ckpt) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.4)  # a few more chunks, a checkpoint or two
        assert proc.poll() is None, "the fit finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert os.path.exists(ckpt)
        h, y = _data()
        kwargs = dict(chunk_bytes=16 * 4 * 100)
        resumed = LELPProjector(3, method=method).fit(h, y, checkpoint=ckpt, checkpoint_every=2, resume=True, **kwargs)
        clean = LELPProjector(3, method=method).fit(h, y, **kwargs)
        assert torch.equal(resumed.A, clean.A) and torch.equal(resumed.e, clean.e), method
        assert not os.path.exists(ckpt)
