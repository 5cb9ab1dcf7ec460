"""pytest-benchmark sessions: ``pytest benchmarks/ --benchmark-only [--device cuda]
[--benchmark-json out.json]``; ``python benchmarks/bench_table.py out.json`` turns the JSON into
the Markdown tables of docs/benchmarks.md (each row next to its peers and its floor, all measured
in the same session). Never part of the test suite: tests/ holds correctness.

Every benchmark's ``group`` is one problem (op, shape, dtype); within a group the ids name who
ran it: ``lelp_fast-<backend>``, a peer (``eager``, ``compile``, ``sklearn-…``, ``faiss``) or
``floor`` (the bytes that must move, at the speed of a plain pass over them).
"""

import platform

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="where the op benchmarks run (cpu, cuda)")
    parser.addoption("--bench-scale", type=float, default=1.0,
                     help="multiplies the rows of every benchmark (0.05 for a quick check of the harness)")


@pytest.fixture(scope="session")
def device(request):
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--device cuda needs a GPU")
    return torch.device(name)


@pytest.fixture(scope="session")
def scale(request):
    return request.config.getoption("--bench-scale")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pytest_benchmark_update_machine_info(config, machine_info):
    import lelp_fast

    machine_info["torch"] = torch.__version__
    machine_info["lelp_fast"] = lelp_fast.__version__
    machine_info["threads"] = torch.get_num_threads()
    machine_info["device"] = config.getoption("--device")
    machine_info["processor"] = platform.processor() or platform.machine()
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()
