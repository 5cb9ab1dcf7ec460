import os
import subprocess

import numpy as np
import pytest
import torch


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def make_problem(n=300, d=24, num_classes=3, seed=0, dtype=torch.float64):
    """Random embeddings with a decaying spectrum, a random head and its argmax labels."""
    g = torch.Generator().manual_seed(seed)
    scales = 1.0 / torch.arange(1, d + 1, dtype=torch.float64).sqrt()
    h = torch.randn(n, d, generator=g, dtype=torch.float64) * scales + torch.randn(d, generator=g, dtype=torch.float64)
    w = torch.randn(num_classes, d, generator=g, dtype=torch.float64)
    b = torch.randn(num_classes, generator=g, dtype=torch.float64)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return h.to(dtype), w, b, y


# ---- The CUDA kernels' bodies on the host (tests/cuda_emu) ----------------------------------------
# Tests parametrized with backend="cuda_emu" run lelp_fast's Python layer as backend "cuda" (its
# CUDA path: the folded gradient, the split-map cache) on CPU tensors, and the extension's loss and
# targets calls go to the CUDA kernels' bodies built for the host (lelp/warp_loss.h,
# lelp/block_targets.h with 32 threads per warp, a block of tile::kThreads, and plain fp32 products
# of whole tiles for the tensor cores): their indexing and numerics meet the reference without a GPU.

_EMU_SOURCES = ["tests/cuda_emu/emu_module.cpp", "tests/cuda_emu/emulate.h", "tests/cuda_emu/host_warp.h",
                "tests/cuda_emu/race_check.cpp", "csrc/make_args.h", "csrc/include/lelp/warp_loss.h",
                "csrc/include/lelp/block_targets.h", "csrc/include/lelp/loss_math.h", "csrc/include/lelp/row_math.h",
                "csrc/cpu/convert.h", "csrc/cpu/loss.h", "csrc/cpu/targets.h"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_emulation(source: str, name: str, flags: list):
    """g++ builds tests/cuda_emu/<source> into the cache once per version of the sources and flags;
    returns the output's path, or None without g++."""
    import hashlib
    import shutil

    gxx = shutil.which("g++")
    if gxx is None:
        return None
    digest = hashlib.sha256(" ".join(flags).encode())
    for rel in _EMU_SOURCES:
        with open(os.path.join(ROOT, rel), "rb") as f:
            digest.update(f.read())
    out_dir = os.path.join(os.path.expanduser("~/.cache/lelp_fast/cuda_emu"), digest.hexdigest()[:16])
    target = os.path.join(out_dir, name)
    if not os.path.exists(target):
        os.makedirs(out_dir, exist_ok=True)
        tmp = f"{target}.{os.getpid()}.tmp"
        subprocess.run([gxx, "-std=c++20", "-pthread", *flags, "-I", os.path.join(ROOT, "csrc/include"),
                        "-I", os.path.join(ROOT, "csrc"), os.path.join(ROOT, "tests/cuda_emu", source), "-o", tmp],
                       check=True, capture_output=True)
        os.replace(tmp, target)
    return target


def build_cuda_emulator():
    """The module tests/cuda_emu/emu_module.cpp; None without g++/pybind11."""
    import importlib.util
    import sysconfig

    try:
        import pybind11
    except ImportError:
        return None
    target = build_emulation("emu_module.cpp", "lelp_cuda_emu" + sysconfig.get_config_var("EXT_SUFFIX"),
                             ["-O1", "-shared", "-fPIC", "-I", pybind11.get_include(),
                              "-I", sysconfig.get_paths()["include"]])
    if target is None:
        return None
    spec = importlib.util.spec_from_file_location("lelp_cuda_emu", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def cuda_emulator():
    module = build_cuda_emulator()
    if module is None:
        why = "the CUDA kernels' host build needs g++ and pybind11 (the test extra)"
        if os.environ.get("CI"):  # CI must run these: the only numerics checks of the CUDA kernels without a GPU
            pytest.fail(why)
        pytest.skip(why)
    return module


class _EmulatedExtension:
    """lelp_fast._C with its CUDA kernels' bodies, run on the host, in place of the CPU loss and targets."""

    def __init__(self, real, emulator):
        self._real, self._emulator = real, emulator

    def __getattr__(self, name):
        return getattr(self._real, name)

    def loss(self, *args, **kwargs):
        return self._emulator.loss(*args, **kwargs)

    def targets_cuda(self, *args):
        return self._emulator.targets(*args)


@pytest.fixture(autouse=True)
def _emulated_cuda_backend(request, monkeypatch):
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("backend") != "cuda_emu":
        return
    from lelp_fast.ops import _dispatch

    proxy = _EmulatedExtension(_dispatch.extension(), request.getfixturevalue("cuda_emulator"))
    resolve, available = _dispatch.resolve, _dispatch.available
    monkeypatch.setattr(_dispatch, "extension", lambda: proxy)
    monkeypatch.setattr(_dispatch, "available", lambda backend, device: backend == "cuda" or available(backend, device))
    monkeypatch.setattr(_dispatch, "resolve", lambda backend, device, unsupported={}: resolve(
        "cuda" if backend == "cuda_emu" else backend, device, unsupported))
