"""The ``lelp-fast`` command line: demo, fit, targets."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Iterator, List, Optional

import numpy as np
import torch

DESCRIPTION = """\
LELP knowledge distillation: fit per-class subspaces of teacher embeddings, then write
subclass soft targets for training a student.

  lelp-fast demo                      run the built-in example (digits, CPU, < 1 minute)
  lelp-fast fit --embeddings E.npy --labels y.npy --head-weight W.npy --head-bias b.npy \\
                --subclasses 4 --out projector.safetensors
  lelp-fast targets --projector projector.safetensors --embeddings E.npy --out targets.npy

Run 'lelp-fast COMMAND --help' for each command's options.
"""


def _load_npy(path: str, name: str) -> np.ndarray:
    """Memory-maps a .npy file so that large inputs are streamed, not loaded."""
    if not os.path.exists(path):
        raise SystemExit(f"error: --{name} {path}: no such file")
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:
        return np.load(path)  # object arrays etc. cannot be memory-mapped
    except Exception as exc:  # noqa: BLE001 - reported with the argument's name
        raise SystemExit(f"error: --{name} {path}: not a readable .npy file ({exc})") from exc


def _row_chunks(n_rows: int, chunk_rows: int) -> Iterator[slice]:
    for start in range(0, n_rows, chunk_rows):
        yield slice(start, min(start + chunk_rows, n_rows))


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, format_markdown, run_demo, write_result

    cfg = DemoConfig(seeds=args.seeds, n_subclasses=args.subclasses, beta=args.beta, tau=args.tau)
    result = run_demo(cfg, progress=not args.quiet)
    print(format_markdown(result))
    if args.out:
        write_result(result, args.out)
        print(f"wrote {args.out}")
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    from .projector import LELPProjector

    emb = _load_npy(args.embeddings, "embeddings")
    labels = _load_npy(args.labels, "labels") if args.labels else None
    logits = _load_npy(args.teacher_logits, "teacher-logits") if args.teacher_logits else None
    head_w = _load_npy(args.head_weight, "head-weight") if args.head_weight else None
    head_b = _load_npy(args.head_bias, "head-bias") if args.head_bias else None
    for name, arr in (("labels", labels), ("teacher-logits", logits)):
        if arr is not None and arr.shape[0] != emb.shape[0]:
            raise SystemExit(f"error: --{name} has {arr.shape[0]} rows but --embeddings has {emb.shape[0]}")
    num_classes = None
    if head_w is None and logits is None and labels is not None:
        num_classes = int(np.max(labels)) + 1 if labels.size else None

    def chunks():
        for rows in _row_chunks(emb.shape[0], args.chunk_rows):
            yield (
                np.asarray(emb[rows]),
                None if labels is None else np.asarray(labels[rows]).astype(np.int64),
                None if logits is None else np.asarray(logits[rows]),
            )

    projector = LELPProjector(
        args.subclasses,
        beta=args.beta,
        tau=args.tau,
        null_space=False if args.no_null_space else None,
        rotate=not args.no_rotate,
        standardize=not args.no_standardize,
        seed=args.seed,
        assign=args.assign,
    )
    projector.fit(
        chunks(),
        head_weight=head_w,
        head_bias=head_b,
        num_classes=num_classes,
        progress=not args.quiet,
    )
    projector.save(args.out)
    captured = ", ".join(f"{v:.3f}" for v in projector.captured_variance().tolist())
    print(f"wrote {args.out}: {projector}; captured variance per class: {captured}")
    return 0


def _cmd_targets(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ._checks import as_tensor
    from .projector import LELPProjector

    projector = LELPProjector.load(args.projector)
    emb = _load_npy(args.embeddings, "embeddings")
    logits = _load_npy(args.teacher_logits, "teacher-logits") if args.teacher_logits else None
    if emb.ndim != 2 or emb.shape[1] != projector.dim:
        raise SystemExit(
            f"error: --embeddings has shape {emb.shape} but the projector expects (N, {projector.dim})"
        )
    if logits is not None and logits.shape[0] != emb.shape[0]:
        raise SystemExit(f"error: --teacher-logits has {logits.shape[0]} rows but --embeddings has {emb.shape[0]}")
    out_dtype = {"float32": torch.float32, "float16": torch.float16}[args.dtype]
    n, k = emb.shape[0], projector.n_outputs
    directory = os.path.dirname(os.path.abspath(args.out))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=directory)
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=args.dtype, shape=(n, k))
        with tqdm(total=n, desc="targets", unit="rows", disable=args.quiet) as bar:
            for rows in _row_chunks(n, args.chunk_rows):
                z = None if logits is None else as_tensor("teacher_logits", np.asarray(logits[rows]))
                t = projector.targets(
                    as_tensor("embeddings", np.asarray(emb[rows])),
                    z,
                    beta=args.beta,
                    tau=args.tau,
                    out_dtype=out_dtype,
                    backend=args.backend,
                )
                out[rows] = t.numpy()
                bar.update(rows.stop - rows.start)
        out.flush()
        del out
        os.replace(tmp, args.out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    print(f"wrote {args.out}: {n} x {k} log-targets ({args.dtype})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lelp-fast", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="train teacher and students on binarised digits; print the comparison table",
        description="Binarised digits (even vs odd, bundled with scikit-learn): train a teacher MLP, "
        "fit LELP on its embeddings, train the same small student with hard labels, vanilla KD "
        "and LELP over several seeds, and print test accuracy and teacher agreement.",
    )
    demo.add_argument("--seeds", type=int, default=5, help="number of seeds (default 5)")
    demo.add_argument("--subclasses", type=int, default=4, help="S, pseudo-subclasses per class (default 4)")
    demo.add_argument("--beta", type=float, default=1.0, help="subclass temperature (default 1)")
    demo.add_argument("--tau", type=float, default=1.0, help="class temperature (default 1)")
    demo.add_argument("--out", help="also write the table: .md for Markdown, else JSON")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_cmd_demo)

    fit = sub.add_parser(
        "fit",
        help="fit a projector on teacher embeddings (.npy) and save it as safetensors",
        description="Fit per-class LELP subspaces. Inputs are .npy files, memory-mapped and read in chunks.",
    )
    fit.add_argument("--embeddings", required=True, help="(N, d) float .npy of teacher embeddings")
    fit.add_argument("--labels", help="(N,) integer .npy of class labels")
    fit.add_argument("--head-weight", help="(C, d) .npy, the teacher head W (enables the null-space projection)")
    fit.add_argument("--head-bias", help="(C,) .npy, the teacher head bias b")
    fit.add_argument("--teacher-logits", help="(N, C) .npy of teacher logits, when no head is given")
    fit.add_argument("--subclasses", type=int, default=4, help="S, pseudo-subclasses per class (default 4)")
    fit.add_argument("--beta", type=float, default=1.0, help="default subclass temperature stored in the projector")
    fit.add_argument("--tau", type=float, default=1.0, help="default class temperature stored in the projector")
    fit.add_argument("--seed", type=int, default=0, help="seed of the random rotations (default 0)")
    fit.add_argument("--assign", choices=("label", "teacher"), default="label",
                     help="fit each class on rows with that label, or that the teacher predicts")
    fit.add_argument("--no-null-space", action="store_true", help="keep the directions the head reads")
    fit.add_argument("--no-rotate", action="store_true", help="skip the random rotation of the subspaces")
    fit.add_argument("--no-standardize", action="store_true", help="do not scale coordinates to unit variance")
    fit.add_argument("--chunk-rows", type=int, default=65536, help="rows read per chunk (default 65536)")
    fit.add_argument("--out", required=True, help="output projector .safetensors")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    fit.set_defaults(func=_cmd_fit)

    tgt = sub.add_parser(
        "targets",
        help="write log-targets (N, C*S) for embeddings with a fitted projector",
        description="Compute LELP log-targets chunk by chunk and write them to a .npy (atomically).",
    )
    tgt.add_argument("--projector", required=True, help="projector .safetensors from 'lelp-fast fit'")
    tgt.add_argument("--embeddings", required=True, help="(N, d) float .npy of teacher embeddings")
    tgt.add_argument("--teacher-logits", help="(N, C) .npy; default: the projector's stored head")
    tgt.add_argument("--beta", type=float, default=None, help="subclass temperature (default: the projector's)")
    tgt.add_argument("--tau", type=float, default=None, help="class temperature (default: the projector's)")
    tgt.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="output dtype")
    tgt.add_argument("--backend", choices=("auto", "torch", "cpu", "cuda"), default="auto")
    tgt.add_argument("--chunk-rows", type=int, default=65536, help="rows per chunk (default 65536)")
    tgt.add_argument("--out", required=True, help="output .npy")
    tgt.add_argument("--quiet", action="store_true", help="no progress bar")
    tgt.set_defaults(func=_cmd_targets)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "chunk_rows", 1) < 1:
        parser.error("--chunk-rows must be a positive integer")
    try:
        return args.func(args)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
