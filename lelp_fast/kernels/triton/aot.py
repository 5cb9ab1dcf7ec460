"""Ahead-of-time compilation of the Triton kernels for a GPU this machine need not have.

``triton.compile`` lowers a kernel for a named target (``GPUTarget("cuda", 90, 32)``) down to a
CUBIN without a driver, so a CPU machine can check what the interpreter cannot: that real Triton
accepts the code (the interpreter runs Python that the compiler refuses), what the PTX holds
(tensor-core ``mma``/``wgmma``, 16-byte copies), and what the GPU would refuse or run slowly:
the shared memory a launch needs against the device's opt-in limit, and the registers, stack
frame and local-memory (spill) instructions that ptxas made — spills exist only in the CUBIN,
never in the PTX. Read with the ``cuobjdump``/``nvdisasm`` that ship inside Triton's package;
``compile_in`` disassembles many kernels per nvdisasm run (``disassemble``).

``python -m lelp_fast.kernels.triton.aot --out facts.json`` compiles every case and writes the
facts; ``tests/test_triton_aot.py`` runs it under the installed Triton (in its own process) and
under the oldest supported one (in a subprocess that imports it first). With ``--recorded DIR`` it
takes the facts of launches recorded in DIR and compiles the rest and a dozen recorded ones afresh
to check them; ``--record DIR`` writes every launch's facts there (``aot_recording``).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import struct
import subprocess
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional, Tuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ARCHS = (80, 90)  # A100, H100/H200
# The oldest Triton the gates also run under (tests/test_triton_aot.py installs it into a cache
# directory): the version on common H100/H200 images. ptxas differs by version (the K = 512 loss
# spilled about 11 KB under 3.6 and nothing under 3.9), so passing under one proves little for the other.
OLDEST_TRITON = "3.6.0"
# cudaDevAttrMaxSharedMemoryPerBlockOptin (CUDA programming guide, compute capabilities table):
# a block may use this much shared memory once the launcher opts in; Triton raises OutOfResources
# above it at the first launch.
SHARED_OPTIN = {80: 166_912, 90: 232_448}
# (student, targets) dtypes of the loss per arch: bf16 and fp32 (the two load widths) on both.
LOSS_DTYPES = {80: [("bf16", "bf16"), ("fp32", "fp32")], 90: [("bf16", "bf16"), ("fp32", "fp32")]}
# (student, targets, gradient) beyond LOSS_DTYPES, on both archs for every variant that writes the
# gradient: the online path, a 16-bit student against the fp32 targets buffer (bf16: the gradient
# folded into bf16; fp16: kept in fp32); an fp16 student (never folded) or reduction="none" against
# 16-bit targets (fp32 gradient); an fp32 student against 16-bit targets. With LOSS_DTYPES that is
# every width (16 or 32 bits) of the three pointers the launcher can pair: registers and the stack
# follow the loads' and stores' widths (tests/test_triton.py checks the launcher's pairs against
# ``compiled_widths``).
MIXED_DTYPES = {arch: [("bf16", "fp32", "bf16"), ("fp16", "fp32", "fp32"), ("fp16", "fp16", "fp32"),
                       ("fp32", "bf16", "fp32")] for arch in ARCHS}
# (student, targets, gradient) of the forward-only variants (WITH_GRAD off) beyond LOSS_DTYPES: their
# gradient pointer is dead code, so what varies is the (student, targets) widths, here 16 against 32
# and 32 against 16 bits (16 against 16 is LOSS_DTYPES' bf16); each pair is in MIXED_DTYPES, where
# the twin that writes the gradient is compiled.
FORWARD_DTYPES = {arch: [("bf16", "fp32", "bf16"), ("fp32", "bf16", "fp32")] for arch in ARCHS}
assert all(set(FORWARD_DTYPES[arch]) <= set(MIXED_DTYPES[arch]) for arch in ARCHS)
# (embeddings, teacher logits, output) beyond the variant's own (logits in the embeddings' dtype, an
# fp32 output), on both archs for every targets variant: with them every width of the logits and the
# output the launcher can pair with each dtype of the embeddings (a head's variants read no logits, so
# only the output's width varies). The embeddings' dtype is kept, not only its width: fp16's dots and
# map parts are not bf16's (until session 58 fp16 was compiled in its own widths only).
TARGETS_DTYPES = {
    arch: {("bf16", True): [("bf16", "fp32", "fp16"), ("bf16", "bf16", "bf16"), ("bf16", "fp32", "fp32")],
           ("fp16", True): [("fp16", "fp32", "bf16"), ("fp16", "fp16", "fp16"), ("fp16", "fp32", "fp32")],
           ("fp32", True): [("fp32", "bf16", "fp32"), ("fp32", "bf16", "bf16"), ("fp32", "fp32", "fp16")],
           ("bf16", False): [("bf16", "bf16", "bf16")],
           ("fp16", False): [("fp16", "fp16", "fp16")],
           ("fp32", False): [("fp32", "fp32", "bf16")]}
    for arch in ARCHS
}
# Each combination starts with its variant's dtype; a head's variants are passed the embeddings as logits.
assert all(h == dtype and (has_logits or z == h)
           for combos in TARGETS_DTYPES.values() for (dtype, has_logits), triples in combos.items()
           for h, z, _ in triples)

# (op: "targets", "loss", "scale" or "kd"; index into its VARIANTS; arch; dtypes: the loss's
# (student, targets) or (student, targets, gradient); the targets' None (their variant's own) or
# (embeddings, teacher logits, output); None for the scale and the KD targets, whose variants name theirs)
Case = Tuple[str, int, int, Optional[Tuple[str, ...]]]


def widths(dtypes) -> Tuple[int, ...]:
    """The bits of each dtype name: what the loads' and stores' vectors, and so the registers, follow."""
    return tuple(32 if name == "fp32" else 16 for name in dtypes)


# The run-time integers Triton's JIT specialises on (runtime/jit.py, ``specialize_impl``): a value of 1
# becomes a constant, a multiple of 16 gets a divisibility hint; it picks i64 past 32 bits.
_DIVISIBLE = [["tt.divisibility", 16]]


def _source(kernel: triton.JITFunction, signature: Dict[str, str], constexprs: Dict[str, object],
            values: Dict[str, int]) -> ASTSource:
    """The kernel as the JIT specialises it for a launch whose run-time integers are ``values``
    (every one named): an integer of 1 is a constant, one divisible by 16 gets the hint (it turns on
    the multi-stage copy pipelines and vector accesses, so it changes the shared memory, registers
    and spills), pointers are 16-byte aligned (torch's allocations). The gates compiled every stride
    and d as divisible and no integer as 1 before 2026-12-04: the H200's JIT then made two kernels
    with 1.5-1.9 KB of stack (S = 1, a constant there) that no gate had compiled."""
    signature, constexprs, attrs = dict(signature), dict(constexprs), {}
    for i, (name, kind) in enumerate(list(signature.items())):
        attrs[(i,)] = []  # as the JIT lists them (floats aside): the same source hash, so the same cache key
        if kind.startswith("*"):
            attrs[(i,)] = _DIVISIBLE
        elif kind in ("i32", "i64"):
            value = values[name]
            if value == 1:
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = _DIVISIBLE
        elif kind != "constexpr":
            del attrs[(i,)]
    return ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)


def _options(num_warps: int, num_stages: int, maxnreg: Optional[int]) -> Dict[str, int]:
    """A launch's compile options as the launcher passes them (``maxnreg`` None: ptxas's choice)."""
    return {"num_warps": num_warps, "num_stages": num_stages, **({} if maxnreg is None else {"maxnreg": maxnreg})}


def compile_kernel(kernel: triton.JITFunction, signature: Dict[str, str], constexprs: Dict[str, object],
                   values: Dict[str, int], arch: int, num_warps: int = 4, num_stages: int = 3,
                   maxnreg: Optional[int] = None):
    """``kernel`` specialised on ``constexprs`` and ``values`` for sm_``arch`` (``.asm``, ``.metadata``);
    raises what Triton raises."""
    options = _options(num_warps, num_stages, maxnreg)
    return triton.compile(_source(kernel, signature, constexprs, values), target=GPUTarget("cuda", arch, 32),
                          options=options)


def triton_cache_key(kernel: triton.JITFunction, signature: Dict[str, str], constexprs: Dict[str, object],
                     values: Dict[str, int], arch: int, num_warps: int = 4, num_stages: int = 3,
                     maxnreg: Optional[int] = None) -> str:
    """The key ``triton.compile`` files this compile under in its cache (``CompiledKernel.hash``),
    computed without compiling: the Triton build, the kernel's source and its dependencies' (with its
    first line number), the specialisation, the backend (ptxas's version, the arch), the options and
    the environment variables that change code."""
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.compiler import make_backend
    from triton.runtime.cache import get_cache_key

    source = _source(kernel, signature, constexprs, values)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    options = backend.parse_options({**_options(num_warps, num_stages, maxnreg), **source.parse_options()})
    key = get_cache_key(source, backend, options, env_vars=get_cache_invalidating_env_vars())
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


# A PTX instruction's opcode with its modifiers (``ld.global.v4.b32``): at a line's start, after a
# label, a ``;`` or a ``{`` (several instructions a line, inline-asm blocks), after an optional guard
# predicate (``@%p1``, ``@!p``).
_PTX_OPCODE = re.compile(r"(?:^|[;{]|[\w$]:)[ \t]*(?:@!?%?\w+[ \t]+)?([a-z][\w.:]*)", re.M)
# Opcodes counted by their leading parts: tensor-core MMAs, 16-byte asynchronous copies (the pipelined
# dot operands), and the exponentials and logarithms: one MUFU op each in the FTZ forms; ptxas wraps
# the plain ``ex2.approx.f32`` in a range check and two multiplies (libdevice's accurate logf has no lg2).
_PTX_HEADS = {"mma": ("mma", "sync"), "wgmma": ("wgmma", "mma_async"),
              "async_copies": ("cp", "async", "cg", "shared", "global"), "ex2_ftz": ("ex2", "approx", "ftz", "f32"),
              "ex2_plain": ("ex2", "approx", "f32"), "lg2_ftz": ("lg2", "approx", "ftz", "f32")}


def ptx_facts(ptx: str) -> Dict[str, int]:
    """Counts of the instructions the design promises in a PTX listing: those of ``_PTX_HEADS``, and
    global loads and stores of 2, 4 or 8 vector lanes, and stores of 16- or 32-bit elements (vector
    ones included). One pass over the opcodes: a regular expression per count over the whole text
    took 32 ms a kernel, most of a warm gate run's time (the same counts on 14,456 PTX files)."""
    facts = dict.fromkeys((*_PTX_HEADS, "vector_loads", "vector_stores", "scalar_stores"), 0)
    for opcode, n in Counter(_PTX_OPCODE.findall(ptx)).items():
        parts = tuple(opcode.split("."))
        for key, head in _PTX_HEADS.items():
            facts[key] += n * (parts[:len(head)] == head)
        if parts[:2] in (("ld", "global"), ("st", "global")):
            vector = any(p in ("v2", "v4", "v8") for p in parts[2:-1])
            if parts[0] == "ld":
                facts["vector_loads"] += n * vector
            else:
                facts["vector_stores"] += n * vector
                facts["scalar_stores"] += n * any(p in ("b16", "b32") for p in parts[2:])
    return facts


def _tool(name: str) -> str:
    """A CUDA binary utility shipped inside Triton's NVIDIA backend (same version as its ptxas)."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found in Triton's package ({path})")
    return path


def text_section(cubin: bytes) -> bytes:
    """The instructions of the one kernel in a Triton CUBIN: its ELF64 ``.text.<kernel>`` section."""
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    entsize, count, names = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * entsize) for i in range(count)]
    strtab = headers[names][4]
    texts = [cubin[h[4]:h[4] + h[5]] for h in headers
             if cubin[strtab + h[0]:cubin.index(b"\0", strtab + h[0])].startswith(b".text.")]
    if len(texts) != 1:
        raise ValueError(f"{len(texts)} .text sections in the CUBIN, expected one kernel")
    return texts[0]


def disassemble(arch: int, texts: List[bytes]) -> List[List[Tuple[int, str]]]:
    """Each kernel's SASS as (address, line) pairs, from one ``nvdisasm`` run over all the kernels'
    instructions laid end to end: nvdisasm spends about 0.3 s of CPU starting up (its tables for
    the arch), more than most kernels take to disassemble, and it reads one file per run. Branch
    targets print as addresses in the concatenation, as the instruction addresses do."""
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(b"".join(texts))
        f.flush()
        # sm_90 code is compiled for sm_90a (wgmma), which a plain SM90 decoder does not take
        text = subprocess.run([_tool("nvdisasm"), "--binary", "SM90a" if arch == 90 else f"SM{arch}", f.name],
                              check=True, capture_output=True, text=True).stdout
    starts = list(itertools.accumulate((len(t) for t in texts[:-1]), initial=0))
    kernels = [[] for _ in texts]
    for line in text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/", line)
        if m:
            address = int(m.group(1), 16)
            kernels[bisect.bisect_right(starts, address) - 1].append((address, line))
    return kernels


_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)(.*)")


def sass_opcodes(sass: List[Tuple[int, str]]) -> Counter:
    """Static count of each SASS opcode (with its modifiers, e.g. ``MUFU.EX2``), NOPs left out."""
    ops = Counter()
    for _, line in sass:
        m = _INSTRUCTION.search(line)
        if m and m.group(1) != "NOP":
            ops[m.group(1)] += 1
    return ops


def sass_loops(sass: List[Tuple[int, str]]) -> List[Dict[str, int]]:
    """The SASS's loops, innermost (shortest) first: for each backward branch, the instructions from
    its target to it (NOPs left out), how many of them are tensor-core MMAs (``HMMA``/``HGMMA``),
    global loads (``LDG``) and local loads/stores (``LDL``/``STL``), and the global loads before the loop.
    A persistent kernel's row-tile loop is the longest; a streamed reduction loop holds the MMAs."""
    at, ops, loops = {}, [], []  # at: address -> instructions (NOPs left out) before it
    for address, line in sass:
        at[address] = len(ops)
        m = _INSTRUCTION.search(line)
        if m is None or m.group(1) == "NOP":
            continue
        ops.append(m.group(1))
        target = re.search(r"\b0x([0-9a-f]+)\s*;", m.group(2)) if m.group(1).startswith("BRA") else None
        start = at.get(int(target.group(1), 16)) if target else None
        if start is not None and start < len(ops) - 1:  # backward, not onto itself
            body, before = ops[start:], ops[:start]
            loops.append({"instructions": len(body), "mma": sum(op.startswith(("HMMA", "HGMMA")) for op in body),
                          "loads": sum(op.startswith("LDG") for op in body),
                          "local_ops": sum(op.startswith(("LDL", "STL")) for op in body),
                          "loads_before": sum(op.startswith("LDG") for op in before)})
    return sorted(loops, key=lambda loop: loop["instructions"])


def cubin_resources(cubin: bytes) -> Dict[str, int]:
    """Registers and stack frame per thread as ptxas allocated them (``cuobjdump -res-usage``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], check=True, capture_output=True,
                              text=True).stdout
    found = re.search(r"REG:(\d+)\s+STACK:(\d+)", text)
    if found is None:
        raise ValueError(f"no resource usage in cuobjdump's output: {text!r}")
    return {"registers": int(found.group(1)), "stack": int(found.group(2))}


def sass_facts(sass: List[Tuple[int, str]], loops: bool = False) -> Dict[str, object]:
    """What the gates read from a kernel's SASS (``disassemble``); its loops on request."""
    ops, found = sass_opcodes(sass), sass_loops(sass)
    facts = {
        # local-memory loads/stores in the SASS: ptxas's spills (or a run-time indexed array)
        "local_ops": sum(n for op, n in ops.items() if op.startswith(("LDL", "STL"))),
        # ... in the loop that holds the most of them (0: each runs once per program)
        "local_ops_in_a_loop": max((loop["local_ops"] for loop in found), default=0),
        "sass": sum(ops.values()),
        "mufu_ex2_lg2": sum(n for op, n in ops.items() if op in ("MUFU.EX2", "MUFU.LG2")),
        "mufu": sum(n for op, n in ops.items() if op.startswith("MUFU")),
    }
    return {**facts, "loops": found} if loops else facts


def build_facts(compiled) -> Dict[str, object]:
    """What the gates read from one compiled kernel that needs no disassembly."""
    return {
        **ptx_facts(compiled.asm["ptx"]),
        **cubin_resources(compiled.asm["cubin"]),
        "shared": int(compiled.metadata.shared),
    }


def kernel_facts(compiled, loops: bool = False) -> Dict[str, object]:
    """Everything the gates read from one compiled kernel (``compile_in`` disassembles many at once)."""
    sass = disassemble(compiled.metadata.target.arch, [text_section(compiled.asm["cubin"])])[0]
    return {**build_facts(compiled), **sass_facts(sass, loops)}


def kd_memory_layouts(variant: dict, arch: int = 90):
    """([(sizePerThread, threadsPerWarp)] of each of a ``kd_targets`` variant's loads, in order; the same
    of its stores), read from the TTGIR of its compile for sm_``arch``, as ``_launch`` launches it
    (``cost.kd_lines_model``). Where the kernels are the interpreter's, run it in ``compiling_pool``.
    Asserts one warp and a thread's values along one row, which the line walk assumes."""
    from . import kd_targets

    ttgir = compile_kernel(kd_targets.kd_targets_kernel, kd_targets.signature(variant), variant["constexprs"],
                           kd_targets.launch_values(variant), arch, variant["num_warps"], 3).asm["ttgir"]
    blocked = {m.group(1): m.group(2) for m in re.finditer(r"^(#blocked\d*) = #ttg.blocked<\{(.*)\}>", ttgir, re.M)}

    def layouts(op: str):
        out = []
        for name in re.findall(rf"tt.{op} [^\n]*, (#blocked\d*)> loc", ttgir):
            fields = {k: [int(x) for x in v.split(",")] for k, v in re.findall(r"(\w+) = \[([\d, ]+)\]", blocked[name])}
            assert fields["warpsPerCTA"] == [1, 1] and fields["sizePerThread"][0] == 1, fields
            out.append((fields["sizePerThread"], fields["threadsPerWarp"]))
        return out
    return layouts("load"), layouts("store")


def cases() -> List[Case]:
    """Every launch configuration the launchers can produce, per arch (and loss dtypes)."""
    from . import kd_targets, loss, targets

    return ([("targets", i, arch, None) for i in range(len(targets.VARIANTS)) for arch in ARCHS]
            + [("targets", i, arch, dts) for arch, combos in TARGETS_DTYPES.items()
               for i, v in enumerate(targets.VARIANTS)
               for dts in combos.get((v["dtype"], v["constexprs"]["HAS_LOGITS"]), [])]
            + [("loss", i, arch, dts) for i in range(len(loss.VARIANTS)) for arch in ARCHS
               for dts in LOSS_DTYPES[arch]]
            + [("loss", i, arch, dts) for arch, combos in MIXED_DTYPES.items() for dts in combos
               for i, v in enumerate(loss.VARIANTS) if v["constexprs"]["WITH_GRAD"]]
            + [("loss", i, arch, dts) for arch, combos in FORWARD_DTYPES.items() for dts in combos
               for i, v in enumerate(loss.VARIANTS) if not v["constexprs"]["WITH_GRAD"]]
            + [("scale", i, arch, None) for i in range(len(loss.SCALE_VARIANTS)) for arch in ARCHS]
            + [("kd", i, arch, None) for i in range(len(kd_targets.VARIANTS)) for arch in ARCHS])


def compiled_widths(op: str, arch: int) -> set:
    """The pointer widths (``widths``) ``cases()`` compiles ``op`` in for sm_``arch``: the loss's
    (student, targets, gradient) where it writes the gradient, "loss-forward" its (student, targets)
    where it does not (the gradient pointer is dead code), the targets' (embeddings, logits, output),
    or (embeddings, output) for a head's variants, which read no logits; the targets' embeddings by
    their dtype's name, not width (fp16's dots and map parts are not bf16's)."""
    from . import loss, targets

    found = set()
    for kind, i, case_arch, dts in cases():
        if case_arch != arch:
            continue
        if kind == "loss" and op in ("loss", "loss-forward"):
            if loss.VARIANTS[i]["constexprs"]["WITH_GRAD"] == (op == "loss"):
                found.add(widths(dts if len(dts) == 3 else (*dts, dts[0]))[:3 if op == "loss" else 2])
        elif kind == "targets" and op == "targets":
            v = targets.VARIANTS[i]
            h, z, out = dts or (v["dtype"], v["dtype"], "fp32")
            found.add((h, *widths((z, out) if v["constexprs"]["HAS_LOGITS"] else (out,))))
    return found


def case_id(case: Case) -> str:
    from . import kd_targets, loss, targets

    op, i, arch, dts = case
    if op == "kd":
        v = kd_targets.VARIANTS[i]
        return (f"kd-sm{arch}-{v['dtype']}-C{v['C']}-n{v['constexprs']['BLOCK_N']}-o{v['out_dtype']}"
                + _rows_suffix(v["rows"]))
    if op == "scale":
        v = loss.SCALE_VARIANTS[i]
        return f"scale-sm{arch}-{v['dtype']}" + ("" if v["numel"] == loss.SCALE_VARIANTS[0]["numel"] else f"-n{v['numel']}")
    if op == "targets":
        v = targets.VARIANTS[i]
        c = v["constexprs"]
        # a set's launches beyond its first: another kind of C, S or C·S (targets.jit_key), other rows
        first_shape = targets.grid_shape(c["C_PAD"], c["S_PAD"], c["EXACT"])
        shape = "" if v["shape"] == first_shape else "-C{}S{}".format(*v["shape"])
        rows = "" if v["rows"] == targets.LAYOUTS[v["layout"]][0] else f"-N{v['rows']}"
        return (f"targets-sm{arch}-{v['dtype']}-n{c['BLOCK_N']}d{c['BLOCK_D']}w{v['config'].num_warps}"
                f"s{v['config'].num_stages}-{c['C_PAD']}x{c['S_PAD']}-{'logits' if c['HAS_LOGITS'] else 'head'}-"
                f"{'exact' if c['EXACT'] else 'pad'}" + ("-d50" if v["layout"] == "unaligned" else "")
                + shape + rows + (f"-z{dts[1]}-o{dts[2]}" if dts else ""))
    v = loss.VARIANTS[i]
    c = v["constexprs"]
    return (f"loss-sm{arch}-{dts[0]}-K{c['K']}-n{c['BLOCK_N']}w{v['num_warps']}-div{c['DIVERGENCE']}-"
            f"{'w' if c['HAS_WEIGHTS'] else 'nw'}-{'y' if c['HAS_LABELS'] else 'ny'}"
            + (f"-S{c['S']}g{c['G_PAD']}-lam-h{c['HARD']}" if c["SUBCLASS_WEIGHTED"] else
               f"-h{c['HARD']}" if c["HAS_LABELS"] else "")
            + ("" if c["WITH_GRAD"] else "-fwd") + (f"-t{dts[1]}-g{dts[2]}" if len(dts) > 2 else "")
            + ("" if loss.first_launch(v) else _rows_suffix(v["rows"]) + f"-M{v['teachers']}"))


def _rows_suffix(rows: int) -> str:
    """A launch's rows in its id where they are not the gates' first (``limits.ROW_COUNTS``)."""
    from . import limits

    return "" if rows == limits.ROW_COUNTS[0] else f"-N{rows}"


def _launch(case: Case) -> tuple:
    """(kernel, signature, constexprs, run-time integers, arch, num_warps, num_stages, maxnreg) of a
    case, as the launcher passes them."""
    from . import kd_targets, loss, targets

    op, i, arch, dts = case
    if op == "kd":
        v = kd_targets.VARIANTS[i]
        return (kd_targets.kd_targets_kernel, kd_targets.signature(v), v["constexprs"], kd_targets.launch_values(v),
                arch, v["num_warps"], 3, None)
    if op == "targets":
        v = targets.VARIANTS[i]
        signature = targets.signature(v["dtype"], logits_dtype=dts and dts[1], out_dtype=dts[2] if dts else "fp32",
                                      has_logits=v["constexprs"]["HAS_LOGITS"])
        return (getattr(targets, v["kernel"]), signature, v["constexprs"], targets.launch_values(v), arch,
                v["config"].num_warps, v["config"].num_stages, None)
    if op == "scale":
        v = loss.SCALE_VARIANTS[i]
        return (loss.scale_unless_one_kernel, loss.scale_signature(v["dtype"]), v["constexprs"],
                loss.scale_launch_values(v), arch, v["num_warps"], 3, None)
    v = loss.VARIANTS[i]
    constexprs = {**v["constexprs"], **loss.chunk_constexprs(v["constexprs"], dts[0])}
    return (loss.lelp_loss_kernel, loss.signature(*dts, flags=v["constexprs"]), constexprs,
            loss.launch_values(v), arch, v["num_warps"], 3, loss.max_registers(v["constexprs"]))


def compile_case(case: Case, afresh: bool = False):
    """(facts but the SASS's, the kernel's instructions, None) or (None, None, error text). ``afresh``:
    compiled even where Triton's cache holds the kernel (TRITON_ALWAYS_COMPILE, which is not in its key)."""
    saved = os.environ.get("TRITON_ALWAYS_COMPILE")
    if afresh:
        os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    try:
        compiled = compile_kernel(*_launch(case))
        return build_facts(compiled), text_section(compiled.asm["cubin"]), None
    except Exception as exc:  # noqa: BLE001 - reported per case by the tests
        return None, None, f"{type(exc).__name__}: {exc}"
    finally:
        _restore("TRITON_ALWAYS_COMPILE", saved)


def _restore(name: str, value: Optional[str]) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def disassembled_facts(arch: int, texts: List[bytes], loops: List[bool]) -> List[tuple]:
    """(sass_facts, None) per kernel of one arch, or (None, error text) for all if nvdisasm fails."""
    try:
        return [(sass_facts(sass, with_loops), None) for sass, with_loops in zip(disassemble(arch, texts), loops)]
    except Exception as exc:  # noqa: BLE001 - reported per case by the tests
        return [(None, f"{type(exc).__name__}: {exc}")] * len(texts)


@contextlib.contextmanager
def compiling_pool(workers: int):
    """Fresh (spawned) processes without TRITON_INTERPRET (under the interpreter the kernels are
    interpreter functions that cannot be compiled nor keyed) and with TRITON_DEFAULT_FP_FUSION set
    (what the JIT does by default; it is in Triton's cache key when set)."""
    saved = {name: os.environ.get(name) for name in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            yield pool
    finally:
        for name, value in saved.items():
            _restore(name, value)


def compile_in(pool, selected: List[Case], workers: int, afresh: frozenset = frozenset()) -> Dict[Case, tuple]:
    """{case: (facts, None) or (None, error)}, compiled in ``pool`` (``compiling_pool``; the cases in
    ``afresh`` past Triton's cache), then disassembled in one nvdisasm run per worker and arch."""
    built = dict(zip(selected, pool.map(compile_case, selected, [c in afresh for c in selected], chunksize=2)))
    batches = [(arch, part) for arch in ARCHS for part in _split(
        [c for c in selected if c[2] == arch and built[c][2] is None], workers)]
    disassembled = pool.map(disassembled_facts, [arch for arch, _ in batches],
                            [[built[c][1] for c in part] for _, part in batches],
                            # the cost model counts a targets row tile's instructions from its loops
                            [[c[0] == "targets" for c in part] for _, part in batches])
    results = {c: (None, built[c][2]) for c in selected}
    for (_, part), facts in zip(batches, disassembled):
        for c, (sass, error) in zip(part, facts):
            results[c] = ({**built[c][0], **sass}, None) if error is None else (None, error)
    return results


def _split(items: list, n: int) -> List[list]:
    """``items`` in at most ``n`` non-empty runs of nearly equal length."""
    size = -(-len(items) // max(1, n)) if items else 1
    return [items[i:i + size] for i in range(0, len(items), size)]


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"a whole number of launches from 0, not {text!r}")
    return int(text)


def main(argv=None) -> int:
    from . import aot_recording as recording

    p = argparse.ArgumentParser(description="Compile every Triton launch configuration; write the facts as JSON.")
    p.add_argument("--out", help="write every case's facts (or error) here as JSON")
    p.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--only", metavar="REGEX", help="compile only the cases whose id (case_id) this matches")
    p.add_argument("--recorded", metavar="DIR", help="take the facts of launches recorded in DIR for this Triton "
                   "build (aot_recording.recall_or_compile) and compile the rest")
    p.add_argument("--check", type=_count, default=12, metavar="N",
                   help="recalled launches compiled afresh and compared with the recording (default 12)")
    p.add_argument("--seed", type=int, help="of the choice of the checked launches (default: random)")
    p.add_argument("--record", metavar="DIR", help="write every launch's facts to DIR's recording for this Triton "
                   "build (all compiled, unless --recorded is given)")
    args = p.parse_args(argv)
    if args.out is None and args.record is None:
        p.error("give --out, --record or both")
    if args.record and args.only:
        p.error("--record writes every launch: leave out --only")
    selected = [c for c in cases() if args.only is None or re.search(args.only, case_id(c))]
    recorded = recording.read_recording(args.recorded) if args.recorded else {}
    results, keys, summary = recording.recall_or_compile(selected, args.workers, recorded, args.check, args.seed)
    if args.record:
        failed = [case_id(c) for c, (_, error) in results.items() if error is not None]
        if failed:
            raise SystemExit(f"not recorded: {len(failed)} launches failed to compile or check, e.g. {failed[:3]}")
        print(recording.write_recording(args.record, results, keys), summary)
    if args.out:
        rows = [dict(case=list(c), id=case_id(c), facts=f, error=e) for c, (f, e) in results.items()]
        with open(args.out, "w") as f:
            json.dump(dict(triton=triton.__version__, cases=rows, summary=summary), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
