"""The ahead-of-time gates' facts, recorded per Triton build, so that a machine with an empty Triton
cache need not compile the 5,600 launches of each version again (0.4-0.6 s of CPU each on a quiet
2-core machine, about 1.3 s under load).

A launch's facts follow from what Triton keys its cache on (``aot.triton_cache_key``: the Triton
build, the kernel's source with its dependencies and first line number, the specialisation, ptxas's
version and the arch, the options, the environment variables that change code) and from the code
that reads them from the kernel (``_fact_readers``); ``launch_key`` hashes both. The file of a
recording names the Triton version, the Python ABI and the machine: Triton's key hashes its
``libtriton`` binary, which differs between the wheels of each.

``recall_or_compile`` takes the recorded facts, compiles the launches it has none for, and compiles
``check`` recorded ones chosen at random afresh (past Triton's cache) to hold the recording to them.
``python -m lelp_fast.kernels.triton.aot --record DIR`` writes a recording.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import itertools
import json
import os
import platform
import random
import sys
from typing import Dict, List, Optional, Tuple

import triton

from . import aot

RecordedFacts = Dict[str, dict]  # launch_key -> facts


def _fact_readers() -> str:
    """The code that turns a compiled kernel into facts, and the module values it reads: a recording
    made by other code is not recalled."""
    readers = (aot._source, aot._options, aot.compile_kernel, aot.compile_case, aot._tool, aot.ptx_facts,
               aot.text_section, aot.disassemble, aot.sass_opcodes, aot.sass_loops, aot.cubin_resources,
               aot.sass_facts, aot.build_facts, aot.disassembled_facts, aot.compile_in)
    values = (aot._PTX_OPCODE, aot._PTX_HEADS, aot._INSTRUCTION)
    return "".join(inspect.getsource(f) for f in readers) + "".join(repr(v) for v in values)


def launch_key(case: aot.Case, readers: Optional[str] = None) -> str:
    """What a case's facts follow from: Triton's cache key of its compile and ``_fact_readers``."""
    key = f"{aot.triton_cache_key(*aot._launch(case))}-{readers or _fact_readers()}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def launch_keys(batch: List[aot.Case]) -> List[str]:
    """``launch_key`` of each case of a batch (run in ``aot.compiling_pool``: in a process where the
    kernels are the interpreter's, they cannot be keyed)."""
    readers = _fact_readers()
    return [launch_key(c, readers) for c in batch]


def recording_path(directory: str) -> str:
    """The recording in ``directory`` of this Triton build."""
    return os.path.join(directory, f"triton-{triton.__version__}-{sys.implementation.cache_tag}-"
                                   f"{platform.machine()}.json.gz")


def read_recording(directory: str) -> RecordedFacts:
    """{launch_key: facts} recorded for this Triton build ({} if none)."""
    path = recording_path(directory)
    if not os.path.exists(path):
        return {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        recorded = json.load(f)
    if recorded["triton"] != triton.__version__:
        raise ValueError(f"{path}: recorded under triton {recorded['triton']}, not {triton.__version__}")
    return {key: row["facts"] for key, row in recorded["launches"].items()}


def write_recording(directory: str, results: Dict[aot.Case, tuple], keys: Dict[aot.Case, str]) -> str:
    """Records the facts of every case that compiled; the same facts give the same bytes (with the
    same zlib)."""
    launches = {keys[c]: {"id": aot.case_id(c), "facts": facts}
                for c, (facts, error) in results.items() if error is None}
    body = json.dumps({"triton": triton.__version__, "launches": launches}, sort_keys=True, separators=(",", ":"))
    os.makedirs(directory, exist_ok=True)
    path = recording_path(directory)
    with open(path + ".tmp", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(body.encode("utf-8"))
    os.replace(path + ".tmp", path)
    return path


def _as_read_back(result: tuple) -> tuple:
    """(facts, error) as a recording reads them back (lists for tuples)."""
    return tuple(json.loads(json.dumps(result)))


# Launches compiled and disassembled at a time: the 24,768 targets launches of a version in one go held
# 4.4 GB per worker's nvdisasm run and 7.3 GB per worker, and were killed for memory at 23 GB (2026-12-06).
COMPILE_CHUNK = 3000


def recall_or_compile(selected: List[aot.Case], workers: int, recording: RecordedFacts, check: int = 12,
                      seed: Optional[int] = None) -> Tuple[Dict[aot.Case, tuple], Dict[aot.Case, str], dict]:
    """({case: (facts, None) or (None, error)}, {case: launch_key}, summary). The facts of a case
    whose key is in ``recording`` are the recording's; the rest are compiled, and ``check`` recalled
    cases chosen at random (``seed``) are compiled afresh: one whose facts differ from the recording's
    gets that as its error. The summary counts the cases recalled and those compiled for want of a
    recording ("unrecorded"), the recorded keys that are no selected case ("stale"), and names the
    checked cases, those that failed the check, and the seed."""
    seed = random.randrange(2 ** 32) if seed is None else seed
    with aot.compiling_pool(workers) as pool:
        keys = dict(zip(selected, itertools.chain.from_iterable(pool.map(launch_keys, aot._split(selected, workers)))))
        recalled = [c for c in selected if keys[c] in recording]
        checked = random.Random(seed).sample(recalled, min(check, len(recalled)))
        unrecorded = [c for c in selected if keys[c] not in recording]
        todo, compiled, afresh = unrecorded + checked, {}, frozenset(checked)
        for start in range(0, len(todo), COMPILE_CHUNK):
            compiled.update(aot.compile_in(pool, todo[start:start + COMPILE_CHUNK], workers, afresh=afresh))
    results = {c: _as_read_back(compiled[c]) if c in compiled else (recording[keys[c]], None) for c in selected}
    failed = []
    for c in checked:
        if results[c] != (recording[keys[c]], None):
            failed.append(aot.case_id(c))
            results[c] = (None, f"the recorded facts {recording[keys[c]]} differ from a fresh compile's {results[c]}")
    summary = {"recalled": len(recalled), "unrecorded": len(unrecorded),
               "stale": len(set(recording) - set(keys.values())),
               "checked": [aot.case_id(c) for c in checked], "check_failed": failed, "seed": seed}
    return results, keys, summary
