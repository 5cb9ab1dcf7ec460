"""The ``lelp-fast`` command line: demo, fit, inspect, targets, teacher-outputs, capture, run, train, tune,
export, bench."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import List, Optional

import numpy as np
import torch

from ._checks import check_count, check_positive
from .io.sources import check_numeric
from .offline.shards import DEFAULT_DTYPE as TARGETS_DTYPE
from .projector import DEFAULT_BETA
from .reference import DEFAULT_SUBCLASS_WEIGHT

DESCRIPTION = """\
LELP knowledge distillation: fit per-class subspaces of teacher embeddings, then write
subclass soft targets for training a student.

  lelp-fast demo                      run the built-in example (digits, CPU, < 1 minute)
  lelp-fast fit --embeddings E.npy --labels y.npy --head-weight W.npy --head-bias b.npy \\
                --subclasses 4 --out projector.safetensors
  lelp-fast inspect projector.safetensors --plot spectrum.png
  lelp-fast targets --projector projector.safetensors --embeddings E.npy --out targets/
  lelp-fast teacher-outputs --logits Z.npy [--top-k 20 --tau 2] --out kd_store/   plain KD, same store
  lelp-fast bench quality --dataset hierarchical --methods LELP "vanilla KD"
  lelp-fast capture --model teacher/ --data train.csv --out cap/   a saved transformers classifier
  lelp-fast run examples/configs/fashion_mnist.yaml   capture -> fit -> targets -> train -> report
  lelp-fast tune examples/configs/fashion_mnist.yaml  choose S, beta, tau on the validation split
  lelp-fast export examples/configs/fashion_mnist.yaml --format onnx --out student.onnx   C class logits
  lelp-fast export --hf-model student/ --subclasses 4 --labels neg pos --out classifier/

Run 'lelp-fast COMMAND --help' for each command's options.
"""


class CommandError(SystemExit):
    """A command's own argument error, "error: ..." (a missing file, flags that go together): exits 2, as
    argparse's errors and the library's do (``main`` prints the message once), where a plain
    ``SystemExit("...")`` exits 1. Its str() is the message."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2


def _argument_type(convert, check):
    """An argparse type from the API's own check (``lelp_fast._checks``), so the CLI and the
    Python API accept and refuse the same values; argparse names the flag in its one-line error."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a{'n integer' if convert is int else ' number'}, "
                                             f"got {text!r}") from None
        try:
            check("value", value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    return parse


positive_int = _argument_type(int, check_count)
non_negative_int = _argument_type(int, lambda name, v: check_count(name, v, minimum=0))
positive_float = _argument_type(float, check_positive)


def chunk_mib(text: str) -> float:
    """argparse type: a finite chunk size of at least 1 KiB, in MiB."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of MiB, got {text!r}") from None
    if not (np.isfinite(value) and value >= 1 / 1024):
        raise argparse.ArgumentTypeError(f"expected a finite size of at least 1/1024 MiB (1 KiB), got {text}")
    return value


def _check_writable(path: str, flag: str) -> None:
    """Fails before a long job when ``path`` could not be written at its end (missing or read-only
    directory, full disk)."""
    import tempfile

    directory = os.path.dirname(os.path.abspath(path))
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-") as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise CommandError(f"error: {flag} {path}: cannot write there ({exc.strerror})") from None


def _load_npy(path: str, name: str) -> np.ndarray:
    """Memory-maps a .npy file so that large inputs are streamed, not loaded."""
    if not os.path.exists(path):
        raise CommandError(f"error: --{name} {path}: no such file")
    try:
        try:
            arr = np.load(path, mmap_mode="r")
        except ValueError:
            arr = np.load(path)  # object arrays etc. cannot be memory-mapped
    except Exception as exc:  # noqa: BLE001 - reported with the argument's name
        raise CommandError(f"error: --{name} {path}: not a readable .npy file ({exc})") from None
    check_numeric(f"--{name} {path}:", arr)
    return arr


def _report(result: dict, markdown: str, out: Optional[str]) -> int:
    """Prints the table; with ``out``, also writes it: .md for Markdown, else JSON (the full result)."""
    import json

    print(markdown)
    if out:
        with open(out, "w") as f:
            f.write(markdown + "\n" if out.endswith(".md") else json.dumps(result, indent=2))
        print(f"wrote {out}")
    return 0


def _check_report_out(out: Optional[str]) -> None:
    """The table's ``--out``, checked before the runs that fill it, not after them."""
    if out:
        _check_writable(out, "--out")


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, format_markdown, run_demo

    _check_report_out(args.out)
    cfg = DemoConfig(seeds=args.seeds, n_subclasses=args.subclasses, tau=args.tau)
    if args.beta is not None:
        cfg.beta = args.beta
    result = run_demo(cfg, progress=not args.quiet)
    return _report(result, format_markdown(result), args.out)


def _cmd_bench_quality(args: argparse.Namespace) -> int:
    from .quality import REAL_TASKS, QualityConfig, format_markdown, run_quality

    _check_report_out(args.out)
    if args.dataset in REAL_TASKS:
        return _bench_real_quality(args)
    if args.students or args.fractions or args.steps or args.mode or args.device:
        raise CommandError(f"error: --students, --fractions, --steps, --mode and --device are for the real-data "
                         f"datasets {tuple(REAL_TASKS)}, not {args.dataset}")
    cfg = QualityConfig(dataset=args.dataset, seeds=args.seeds or 5, n_subclasses=args.subclasses or 4,
                        beta=args.beta or 1.0, tau=args.tau or 1.0, student_fraction=args.student_fraction,
                        student_hidden=args.student_hidden)
    try:
        result = run_quality(cfg, args.methods, progress=not args.quiet)
    except ValueError as exc:
        raise CommandError(f"error: {exc}") from exc
    return _report(result, format_markdown(result), args.out)


def _bench_real_quality(args: argparse.Namespace) -> int:
    from .quality import format_real_markdown, real_config, run_real_quality

    given = {"students": args.students, "fractions": args.fractions, "steps": args.steps, "seeds": args.seeds,
             "n_subclasses": args.subclasses, "beta": args.beta, "tau": args.tau, "device": args.device,
             "cache_dir": args.cache_dir}
    try:
        cfg = real_config(args.dataset, args.mode or "cpu", **{k: v for k, v in given.items() if v is not None})
        result = run_real_quality(cfg, args.methods, progress=not args.quiet)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise CommandError(f"error: {exc}") from exc
    return _report(result, format_real_markdown(result), args.out)


def _fit_source(args: argparse.Namespace):
    """The source named on the command line: .npy (+ label/logit .npy), .safetensors or .parquet."""
    from .io import NpySource, ParquetSource, SafetensorsSource

    path = args.embeddings
    if not os.path.exists(path):
        raise CommandError(f"error: --embeddings {path}: no such file")
    for name in ("labels", "teacher_logits"):
        extra = getattr(args, name)
        if extra and not os.path.exists(extra):
            raise CommandError(f"error: --{name.replace('_', '-')} {extra}: no such file")
    if os.path.isdir(path):  # a capture directory: labels and teacher logits are inside it
        from .capture import CaptureSource

        if args.labels or args.teacher_logits:
            raise CommandError(f"error: --embeddings {path} is a capture directory: drop --labels/--teacher-logits")
        return CaptureSource(path, verify=not args.no_verify)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        return NpySource(path, args.labels, args.teacher_logits, bf16=args.bf16)
    if ext in (".parquet", ".pq") and (args.labels or args.teacher_logits):
        raise CommandError(f"error: --embeddings {path}: a Parquet file's labels and logits are its columns "
                         "(--labels-key, --logits-key), not --labels/--teacher-logits files")
    labels = None if args.labels is None else np.load(args.labels, mmap_mode="r")
    logits = None if args.teacher_logits is None else np.load(args.teacher_logits, mmap_mode="r")
    if ext == ".safetensors":
        return SafetensorsSource(path, embeddings_key=args.embeddings_key, labels_key=args.labels_key,
                                 logits_key=args.logits_key, labels=labels, teacher_logits=logits)
    if ext in (".parquet", ".pq"):
        return ParquetSource(path, embeddings_column=args.embeddings_key, labels_column=args.labels_key,
                             logits_column=args.logits_key if args.logits_key != "teacher_logits" else None)
    raise CommandError(f"error: --embeddings {path}: unknown extension {ext!r} (use .npy, .safetensors or .parquet)")


_STARTED_GROUP = False  # whether _process_group started the default group (main() ends it)


def _process_group(device: Optional[str]):
    """The default group when launched by torchrun (WORLD_SIZE > 1), else None: NCCL for a GPU
    device (it takes only GPU tensors), gloo for the CPU."""
    global _STARTED_GROUP
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        on_gpu = (device or "cpu").startswith("cuda")
        # NCCL's collectives (the closing barrier too) run on the rank's own GPU, not one they guess
        bound = torch.device(device) if on_gpu and torch.device(device).index is not None else None
        dist.init_process_group("nccl" if on_gpu else "gloo", **({"device_id": bound} if bound else {}))
        _STARTED_GROUP = True
    return dist.group.WORLD


def _end_process_group(finished: bool) -> None:
    """Destroys the group ``_process_group`` started, while the interpreter is whole: a group left to
    the interpreter's finalisation can abort the process (SIGABRT from gloo's threads, pytorch/pytorch
    PR 179291) after its work is written. A rank that finished waits for the others first, so none
    tears its links down while another still uses them."""
    global _STARTED_GROUP
    if not _STARTED_GROUP:
        return
    import torch.distributed as dist

    _STARTED_GROUP = False
    if not dist.is_initialized():
        return
    try:
        if finished:
            dist.barrier()
    except RuntimeError:  # another rank failed and left: nothing more to wait for
        pass
    finally:
        dist.destroy_process_group()


def _rank_device(device: Optional[str]) -> Optional[str]:
    """Under torchrun, a bare ``cuda`` means this rank's GPU (``cuda:LOCAL_RANK``)."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def _projector_from_args(args: argparse.Namespace):
    from .projector import LELPProjector

    return LELPProjector(
        args.subclasses,
        beta=args.beta,
        tau=args.tau,
        null_space=False if args.no_null_space else None,
        rotate=not args.no_rotate,
        standardize=not args.no_standardize,
        seed=args.seed,
        assign=args.assign,
        method=args.method,
        oversampling=args.oversampling,
        passes=args.passes,
        iteration_sample=args.iteration_sample,
    )


def _cmd_fit(args: argparse.Namespace) -> int:
    from .io.locks import ExclusiveLock

    source = _fit_source(args)
    head_w = _load_npy(args.head_weight, "head-weight") if args.head_weight else None
    head_b = _load_npy(args.head_bias, "head-bias") if args.head_bias else None
    projector = _projector_from_args(args)
    device = _rank_device(args.device)
    group = _process_group(device)
    rank = 0 if group is None else torch.distributed.get_rank(group)
    if args.checkpoint:
        _check_writable(args.checkpoint, "--checkpoint")
    with contextlib.ExitStack() as held:
        if rank == 0:  # checked and held before the fit, not discovered after it
            _check_writable(args.out, "--out")
            held.enter_context(ExclusiveLock(os.path.abspath(args.out) + ".lock", f"--out {args.out}"))
        projector.fit(
            source, head_weight=head_w, head_bias=head_b, num_classes=args.num_classes,
            chunk_bytes=int(args.chunk_mb * (1 << 20)), nan_policy=args.nan_policy, process_group=group,
            checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every, resume=args.resume,
            progress=not args.quiet, device=device or "cpu",
        )
        if rank == 0:
            projector.save(args.out)
            info = projector.fit_info
            captured = ", ".join(f"{v:.3f}" for v in projector.captured_variance().tolist())
            print(f"wrote {args.out}: {projector}, method={projector.fitted_method}; {info['rows']} rows"
                  f" ({info['rows_skipped']} skipped) in {projector.fit_timing['seconds']:.1f} s; "
                  f"captured variance per class: {captured}")
            if head_w is not None and head_b is None:
                print(f"  head bias: {_bias_taken(projector)}")
    return 0


def _bias_taken(projector) -> str:
    """Which bias a fit given --head-weight alone took (its targets from embeddings use it)."""
    info = projector.fit_info
    if info.get("head_bias_from") == "logits":
        return (f"none given: the one the teacher logits show, to ±{info['head_bias_from_logits']:.3g} "
                "(pass --head-bias for the exact one)")
    if info.get("head_bias_from") == "zero":
        return "none given and no teacher logits to read it from: zero (pass --head-bias if the head has one)"
    return "none given: the capture's stored one"


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .projector import LELPProjector

    if not os.path.exists(args.projector):
        raise CommandError(f"error: projector {args.projector}: no such file")
    p = LELPProjector.load(args.projector)
    meta = p.metadata()
    print(f"{args.projector}: {p}")
    for key in ("fitted_method", "passes", "iteration_sample", "oversampling", "seed", "null_space", "rotate",
                "standardize", "assign", "version"):
        print(f"  {key}: {meta[key]}")
    if meta.get("fit_info"):
        print(f"  fit: {meta['fit_info']}")
    captured = p.captured_variance()
    for c in range(p.num_classes):
        evals = ", ".join(f"{v:.4g}" for v in p.eigenvalues[c].tolist())
        print(f"  class {c}: {int(p.class_counts[c])} rows, captured variance {float(captured[c]):.4f}, "
              f"top eigenvalues [{evals}]")
    if args.plot:
        _plot_spectrum(p, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _plot_spectrum(p, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    captured = p.captured_variance()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    s = np.arange(1, p.n_subclasses + 1)
    for c in range(p.num_classes):
        evals = p.eigenvalues[c].numpy()
        ax1.semilogy(s, evals, marker="o", label=f"class {c}")
        ax2.plot(s, np.cumsum(evals) / float(p.total_variance[c]), marker="o",
                 label=f"class {c} ({100 * float(captured[c]):.1f}%)")
    ax1.set(xlabel="subclass direction", ylabel="eigenvalue", title="per-class spectrum (top S)")
    ax2.set(xlabel="directions kept", ylabel="fraction of class variance", title="captured variance", ylim=(0, None))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"LELP projector: C={p.num_classes}, S={p.n_subclasses}, d={p.dim}, {p.fitted_method}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cmd_targets(args: argparse.Namespace) -> int:
    from .offline import generate_targets
    from .projector import LELPProjector

    if args.compact and (args.beta is not None or args.tau is not None):
        raise CommandError("error: --beta and --tau are chosen when --compact targets are read (TargetsDataset(dir, "
                         "beta=, tau=), the run config's targets.beta/tau), not stored; drop them here")
    if not os.path.exists(args.projector):
        raise CommandError(f"error: --projector {args.projector}: no such file")
    projector = LELPProjector.load(args.projector)
    source = _fit_source(args)
    device = _rank_device(args.device)
    group = _process_group(device)
    try:
        manifest = generate_targets(
            projector, source, args.out, format=args.format, dtype=args.dtype, compact=args.compact,
            beta=args.beta, tau=args.tau, chunk_bytes=int(args.chunk_mb * (1 << 20)), backend=args.backend,
            device=device, process_group=group, progress=not args.quiet, verify=not args.no_verify,
        )
    except (ValueError, OSError) as exc:
        raise CommandError(f"error: {exc}") from exc
    if group is None or torch.distributed.get_rank() == 0:
        what = "u + teacher logits (compact)" if args.compact else "log-targets"
        print(f"wrote {args.out}: {manifest['n_rows']} rows x {manifest['settings']['K']} {what}, "
              f"{len(manifest['shards'])} {args.format} shards ({args.dtype}), manifest.json")
    return 0


def _cmd_teacher_outputs(args: argparse.Namespace) -> int:
    from .offline import store_teacher_outputs

    if (args.logits is None) == (args.capture is None):
        raise CommandError("error: give --logits FILE.npy or --capture DIR (one of the two)")
    for flag, path in (("--logits", args.logits), ("--capture", args.capture)):
        if path is not None and not os.path.exists(path):
            raise CommandError(f"error: {flag} {path}: no such file or directory")
    if args.tau is not None and not args.top_k:
        raise CommandError("error: --tau is the temperature of --top-k's log-probabilities; plain logits are stored "
                         "as they are (the loss applies its own tau)")
    source = _load_npy(args.logits, "logits") if args.logits else args.capture
    group = _process_group(None)  # under torchrun the shards are shared, as the targets' are
    manifest = store_teacher_outputs(
        source, args.out, top_k=args.top_k, tau=args.tau or 1.0, format=args.format,
        dtype=args.dtype, chunk_bytes=int(args.chunk_mb * (1 << 20)), process_group=group, progress=not args.quiet,
        verify=not args.no_verify)
    if group is not None and torch.distributed.get_rank() != 0:
        return 0
    what = f"top-{args.top_k} log-probabilities at tau={args.tau or 1.0} and indices" if args.top_k else "logits"
    print(f"wrote {args.out}: {manifest['n_rows']} rows of teacher {what} ({manifest['settings']['K']} classes), "
          f"{len(manifest['shards'])} {args.format} shards, manifest.json")
    return 0


def _cmd_capture(args: argparse.Namespace) -> int:
    from .capture.text import capture_text

    device = _rank_device(args.device)  # under torchrun each rank on its own GPU
    group = _process_group(device)
    manifest = capture_text(
        args.model, args.data, args.out, tokenizer_dir=args.tokenizer, text_column=args.text_column,
        label_column=args.label_column, batch_size=args.batch_size, max_length=args.max_length, dtype=args.dtype,
        batches_per_shard=args.batches_per_shard, device=device or "cpu", autocast=args.autocast,
        process_group=group, progress=not args.quiet,
    )
    if group is None or torch.distributed.get_rank() == 0:  # once under torchrun
        print(f"wrote {args.out}: {manifest['n_rows']} rows in {len(manifest['shards'])} shards (embeddings, "
              f"teacher logits, labels) and the head, manifest.json")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from .config import load_config
    from .tune import TuneGrid, tune

    cfg = load_config(args.config, args.set)
    if args.work_dir:
        cfg.work_dir = args.work_dir
    grid = TuneGrid(subclasses=args.subclasses, betas=args.betas, taus=args.taus, steps=args.steps,
                    final_steps=args.final_steps, keep=args.keep, evals=args.evals, seeds=args.seeds,
                    fraction=args.fraction, subclass_weights=args.subclass_weights or (None,))
    tune(cfg, grid, capture_dir=args.capture)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import yaml

    from .config import load_config
    from .run import run

    cfg = load_config(args.config, [*args.set, *([f"work_dir={args.work_dir}"] if args.work_dir else [])])
    if args.print_config:
        print(yaml.safe_dump(cfg.model_dump(), sort_keys=False), end="")
        return 0
    report = run(cfg, until=args.until, redo=args.redo, progress=not args.quiet)
    if report is not None:
        with open(os.path.join(cfg.work_dir, "report.md")) as f:
            print(f.read(), end="")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    if (args.config is None) == (args.hf_model is None):
        raise CommandError("error: give a run CONFIG or --hf-model DIR (one of the two)")
    if args.hf_model is not None:
        from .export.hf import export_hf

        if args.subclasses is None:
            raise CommandError("error: --hf-model needs --subclasses (S, the student's outputs per class)")
        if args.format is not None or args.set:
            raise CommandError("error: --format and --set are for a run CONFIG's student; --hf-model writes a "
                             "transformers directory (save_pretrained)")
        model = export_hf(args.hf_model, args.out, n_subclasses=args.subclasses, tau=args.tau or 1.0,
                          labels=args.labels, tokenizer=args.tokenizer)
        names = ", ".join(model.config.id2label[i] for i in range(model.config.num_labels))
        print(f"wrote {args.out}: a transformers classifier with labels {names} (load it after "
              "'import lelp_fast.export.hf', or with trust_remote_code=True)")
        return 0
    from .config import load_config
    from .export.from_run import export_run

    if args.subclasses or args.tau or args.labels or args.tokenizer:
        raise CommandError("error: --subclasses, --tau, --labels and --tokenizer are for --hf-model; a run CONFIG "
                         "takes them from its training report")
    cfg = load_config(args.config, args.set)
    if args.work_dir:
        cfg.work_dir = args.work_dir
    fmt = args.format or "torch-export"
    model = export_run(cfg, args.out, fmt)
    print(f"wrote {args.out}: {fmt}, inputs -> {model.num_classes} class logits "
          f"(S={model.n_subclasses} pooled at tau={model.tau})")
    return 0


def _add_set(parser: argparse.ArgumentParser, why: str = "") -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=3 --set fit.beta=0.1 (repeatable)"
                        + (f"; {why}" if why else ""))


def _add_export(sub) -> None:
    from .export import FORMATS

    exp = sub.add_parser(
        "export",
        help="save the trained student as a C-class model (the S-way pooling folded in)",
        description="A run CONFIG: the student in work_dir/student, pooled at the training tau, saved as a "
        "torch.export program (.pt2), ONNX or TorchScript. --hf-model: a transformers student with C*S labels "
        "saved as a classifier whose config and pipeline answer with the C labels.",
    )
    exp.add_argument("config", nargs="?", help="YAML run config whose student was trained")
    exp.add_argument("--format", choices=FORMATS, default=None,
                     help="for a run CONFIG (default torch-export)")
    exp.add_argument("--work-dir", help="override the config's work_dir")
    _add_set(exp, "as the run was given them")
    exp.add_argument("--hf-model", help="save_pretrained directory of a transformers student with C*S labels")
    exp.add_argument("--subclasses", type=positive_int, help="S (--hf-model)")
    exp.add_argument("--tau", type=positive_float, help="the loss's tau (--hf-model; default 1)")
    exp.add_argument("--labels", nargs="+", help="the C class names (--hf-model; default LABEL_i)")
    exp.add_argument("--tokenizer", help="tokenizer directory to save alongside (--hf-model; default: the model's)")
    exp.add_argument("--out", required=True, help="output file (run CONFIG) or directory (--hf-model)")
    exp.set_defaults(func=_cmd_export)


def _add_demo(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="train teacher and students on binarised digits; print the comparison table",
        description="Binarised digits (even vs odd, bundled with scikit-learn): train a teacher MLP, "
        "fit LELP on its embeddings, train a linear and a small MLP student with hard labels, vanilla KD, "
        "LELP and the oracle (true digits as subclasses) over several seeds, and print test accuracy and the "
        "paired difference from KD.",
    )
    demo.add_argument("--seeds", type=positive_int, default=5, help="number of seeds (default 5)")
    demo.add_argument("--subclasses", type=int, default=4, help="S, pseudo-subclasses per class (default 4)")
    demo.add_argument("--beta", type=positive_float, help="subclass temperature (default: the library's, "
                      "lelp_fast.projector.DEFAULT_BETA)")
    demo.add_argument("--tau", type=positive_float, default=1.0, help="class temperature (default 1)")
    demo.add_argument("--out", help="also write the table: .md for Markdown, else JSON")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_cmd_demo)


def _add_fit(sub) -> None:
    fit = sub.add_parser(
        "fit",
        help="fit a projector on teacher embeddings and save it as safetensors",
        description="Fit per-class LELP subspaces, streaming the embeddings in chunks (.npy, "
        ".safetensors, .parquet). Under torchrun the rows are sharded across ranks.",
    )
    fit.add_argument("--embeddings", required=True, help="(N, d) embeddings: .npy, .safetensors, "
                     ".parquet, or a capture directory (labels, logits and head inside)")
    fit.add_argument("--labels", help="(N,) integer .npy of class labels (else read from the file when it has them)")
    fit.add_argument("--head-weight", help="(C, d) .npy, the teacher head W (enables the null-space projection)")
    fit.add_argument("--head-bias", help="(C,) .npy, the teacher head bias b (default: a capture's, else the "
                     "one the rows' teacher logits show, else 0)")
    fit.add_argument("--teacher-logits", help="(N, C) .npy of teacher logits, when no head is given")
    fit.add_argument("--num-classes", type=positive_int, help="C, when neither a head nor the logits give it")
    fit.add_argument("--embeddings-key", default="embeddings", help="tensor/column name of the embeddings")
    fit.add_argument("--labels-key", default="labels", help="tensor/column name of the labels")
    fit.add_argument("--logits-key", default="teacher_logits", help="tensor/column name of the teacher logits")
    fit.add_argument("--bf16", action="store_true", help="the .npy holds bf16 bits as uint16")
    fit.add_argument("--subclasses", type=positive_int, default=4, help="S, pseudo-subclasses per class (default 4)")
    fit.add_argument("--method", choices=("auto", "exact", "nystrom"), default="auto",
                     help="exact covariance, Nystrom sketch, or auto by their flops (default auto)")
    fit.add_argument("--passes", type=positive_int, default=3, help="passes over the data for nystrom (default 3)")
    fit.add_argument("--iteration-sample", type=float, default=0.125,
                     help="share of the chunks the nystrom passes before the last read (default 0.125; 1: all)")
    fit.add_argument("--oversampling", type=non_negative_int, default=10, help="extra sketch columns beyond S (default 10)")
    fit.add_argument("--beta", type=positive_float, default=DEFAULT_BETA,
                     help=f"default subclass temperature stored in the projector (default {DEFAULT_BETA})")
    fit.add_argument("--tau", type=positive_float, default=1.0, help="default class temperature stored in the projector")
    fit.add_argument("--seed", type=int, default=0, help="seed of the random rotations and sketches (default 0)")
    fit.add_argument("--assign", choices=("label", "teacher"), default="label",
                     help="fit each class on rows with that label, or that the teacher predicts")
    fit.add_argument("--no-null-space", action="store_true", help="keep the directions the head reads")
    fit.add_argument("--no-rotate", action="store_true", help="skip the random rotation of the subspaces")
    fit.add_argument("--no-standardize", action="store_true", help="do not scale coordinates to unit variance")
    fit.add_argument("--nan-policy", choices=("raise", "skip"), default="raise",
                     help="stop at the first NaN/Inf row (default), or skip and count such rows")
    fit.add_argument("--chunk-mb", type=chunk_mib, default=64, help="MiB of embeddings per chunk (default 64)")
    fit.add_argument("--checkpoint", help="checkpoint file for the statistics (resumable fits)")
    fit.add_argument("--checkpoint-every", type=positive_int, default=16,
                     help="chunks between checkpoints (default 16)")
    fit.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    fit.add_argument("--no-verify", action="store_true",
                     help="do not check a capture directory's shard checksums as they are read (default: check)")
    fit.add_argument("--out", required=True, help="output projector .safetensors")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    fit.add_argument("--device", help="where the statistics are accumulated, e.g. cuda (default: cpu)")
    fit.set_defaults(func=_cmd_fit)


def _add_inspect(sub) -> None:
    inspect = sub.add_parser(
        "inspect",
        help="print a projector's settings, per-class spectrum and captured variance",
        description="Summarise a fitted projector; --plot writes the per-class spectrum as a PNG (matplotlib).",
    )
    inspect.add_argument("projector", help="projector .safetensors")
    inspect.add_argument("--plot", help="write the spectrum and captured-variance plot to this .png")
    inspect.set_defaults(func=_cmd_inspect)


def _add_targets(sub) -> None:
    tgt = sub.add_parser(
        "targets",
        help="write log-targets (N, C*S) for embeddings with a fitted projector (sharded, resumable)",
        description="Compute LELP log-targets chunk by chunk and write them as shards (.npy, .safetensors or "
        ".parquet) with a manifest.json. Every shard is written atomically; rerunning the same command after "
        "an interruption continues where it stopped. Under torchrun the chunks are shared across ranks.",
    )
    tgt.add_argument("--projector", required=True, help="projector .safetensors from 'lelp-fast fit'")
    tgt.add_argument("--embeddings", required=True, help="(N, d) embeddings: .npy, .safetensors, "
                     ".parquet, or a capture directory (labels, logits and head inside)")
    tgt.add_argument("--teacher-logits", help="(N, C) .npy; default: the projector's stored head")
    tgt.add_argument("--embeddings-key", default="embeddings", help="tensor/column name of the embeddings")
    tgt.add_argument("--logits-key", default="teacher_logits", help="tensor/column name of the teacher logits")
    tgt.add_argument("--bf16", action="store_true", help="the .npy holds bf16 bits as uint16")
    tgt.add_argument("--beta", type=positive_float, default=None, help="subclass temperature (default: the projector's)")
    tgt.add_argument("--tau", type=positive_float, default=None, help="class temperature (default: the projector's)")
    tgt.add_argument("--format", choices=("npy", "safetensors", "parquet"), default="npy",
                     help="shard format (default npy, memory-mappable)")
    tgt.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=TARGETS_DTYPE,
                     help=f"stored dtype (default {TARGETS_DTYPE})")
    tgt.add_argument("--compact", action="store_true",
                     help="store u and the teacher logits instead, to choose beta/tau at training time")
    tgt.add_argument("--backend", choices=("auto", "torch", "cpu", "cuda", "triton"), default="auto")
    tgt.add_argument("--device", help="compute device, e.g. cuda (default: cpu)")
    tgt.add_argument("--chunk-mb", type=chunk_mib, default=64,
                     help="MiB of embeddings per chunk and shard (default 64)")
    tgt.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    tgt.add_argument("--no-verify", action="store_true",
                     help="check shard sizes only, not their checksums: of a capture directory read as --embeddings, "
                          "and over a finished --out (default: checksums too; damaged output shards are rewritten)")
    tgt.add_argument("--quiet", action="store_true", help="no progress bar")
    tgt.set_defaults(func=_cmd_targets, labels=None, labels_key=None)


def _add_teacher_outputs(sub) -> None:
    cmd = sub.add_parser(
        "teacher-outputs",
        help="store a teacher's logits or top-k log-probabilities for plain KD (sharded, checksummed, resumable)",
        description="The targets engine without a projector: the teacher's logits (the KD temperature chosen when "
        "training: TargetsDataset(dir, tau=...)), or with --top-k its k most probable classes' log-probabilities "
        "at --tau and their indices. Rerunning the same command after an interruption continues where it stopped.",
    )
    cmd.add_argument("--logits", help="(N, C) .npy of teacher logits (memory-mapped)")
    cmd.add_argument("--capture", help="a capture directory (its stored teacher logits)")
    cmd.add_argument("--top-k", type=positive_int, help="store only the k most probable classes")
    cmd.add_argument("--tau", type=positive_float, help="temperature of the top-k log-probabilities (--top-k; "
                     "default 1)")
    cmd.add_argument("--format", choices=("npy", "safetensors", "parquet"), default="npy")
    cmd.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    cmd.add_argument("--chunk-mb", type=chunk_mib, default=64, help="MiB of logits per shard (default 64)")
    cmd.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    cmd.add_argument("--no-verify", action="store_true", help="over a finished --out, check shard sizes only")
    cmd.add_argument("--quiet", action="store_true", help="no progress bar")
    cmd.set_defaults(func=_cmd_teacher_outputs)


def _add_capture(sub) -> None:
    cap = sub.add_parser(
        "capture",
        help="run a saved transformers classifier over a text table; store embeddings, logits, labels, head",
        description="Loads a model and tokenizer saved with save_pretrained (local directories, no download), "
        "reads a text and a label column from a .csv or .parquet file and writes resumable, checksummed shards "
        "that 'fit' and 'targets' read directly (--embeddings DIR). The embedding is the classifier head's input. "
        "For any other nn.Module use lelp_fast.capture.capture in Python.",
    )
    cap.add_argument("--model", required=True, help="directory of a save_pretrained sequence classifier")
    cap.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    cap.add_argument("--data", required=True,
                     help=".csv or .parquet file, or a datasets save_to_disk directory, with the texts and labels")
    cap.add_argument("--text-column", default="text")
    cap.add_argument("--label-column", default="label")
    cap.add_argument("--batch-size", type=positive_int, default=32)
    cap.add_argument("--max-length", type=positive_int, help="tokens per text (truncated; default 128, or the "
                     "model's positions if fewer)")
    cap.add_argument("--batches-per-shard", type=positive_int, default=16)
    cap.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                     help="storage dtype of the embeddings")
    cap.add_argument("--device", default="cpu")
    cap.add_argument("--autocast", choices=("float16", "bfloat16"), help="run the teacher under autocast")
    cap.add_argument("--out", required=True, help="capture directory")
    cap.add_argument("--quiet", action="store_true", help="no progress bar")
    cap.set_defaults(func=_cmd_capture)


def _add_bench(sub) -> None:
    from .methods.subclass_variants import VARIANTS
    from .quality import DATASETS, METHODS, REAL_METHODS, REAL_TASKS, STUDENT_KINDS

    bench = sub.add_parser("bench", help="benchmarks that ship with the package (quality)")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    quality = bench_sub.add_parser(
        "quality",
        help="every distillation method on a download-free task, several seeds (any row on its own)",
        description="Teacher, hard labels, vanilla and annealing KD, LELP (default and tuned), the pseudo-subclass "
        "ablations and the multi-teacher variants; test accuracy, agreement and predictive KL, mean ± std over "
        "seeds. --methods reruns chosen rows.",
    )
    quality.add_argument("--dataset", choices=tuple(DATASETS) + tuple(REAL_TASKS), default="digits-parity",
                         help=f"real data (a CNN or WordLlama teacher, several students): {', '.join(REAL_TASKS)}")
    quality.add_argument("--methods", nargs="+", choices=tuple(dict.fromkeys(METHODS + REAL_METHODS + VARIANTS)),
                         metavar="METHOD", help=f"rows to run (default all): {', '.join(METHODS)}; on real data: "
                         f"{', '.join(REAL_METHODS)}; issue 22's LELP variants, when named: {', '.join(VARIANTS)}")
    quality.add_argument("--seeds", type=positive_int, help="default 5")
    quality.add_argument("--subclasses", type=positive_int, help="S (default 4)")
    quality.add_argument("--beta", type=positive_float,
                         help="default 1 (the toy tasks) or the library default (real data)")
    quality.add_argument("--tau", type=positive_float, help="default 1")
    quality.add_argument("--student-fraction", type=float, default=0.25,
                         help="training rows the students see (toy tasks)")
    quality.add_argument("--student-hidden", type=int, default=32,
                         help="hidden units of the student MLP, 0: linear (toy tasks)")
    quality.add_argument("--mode", choices=("cpu", "gpu"), help="real data: cpu (default; linear and MLP students, "
                         "18 min on 2 cores once the teacher is cached) or gpu (adds a CNN student, 4x the steps, "
                         "on cuda)")
    quality.add_argument("--students", nargs="+", choices=STUDENT_KINDS, help="real data: student kinds")
    quality.add_argument("--fractions", nargs="+", type=float,
                         help="real data: shares of the training pool to distil from")
    quality.add_argument("--steps", type=positive_int, help="real data: optimiser steps per student")
    quality.add_argument("--device", help="real data: torch device (default cpu, or cuda with --mode gpu)")
    quality.add_argument("--cache-dir", help="real data: where the trained teacher's outputs are kept "
                         "(default ~/.cache/lelp_fast/quality)")
    quality.add_argument("--out", help="also write the table: .md for Markdown, else JSON (with per-seed rows)")
    quality.add_argument("--quiet", action="store_true", help="no progress bar")
    quality.set_defaults(func=_cmd_bench_quality)


def _add_tune(sub) -> None:
    tune = sub.add_parser(
        "tune",
        help="choose S, beta and tau of a YAML run config on its validation split, or KD (proxy students)",
        description="Captures if needed, fits one projector per S, and trains the config's student for a fixed "
        "number of steps on several seeds for KD (S = 1, each tau) and every (S, beta, tau), each proxy scored at "
        "its best validation evaluation. LELP is chosen over KD only when its paired validation gain on fresh "
        "seeds has a 95 % interval above 0; ties and skipped S values are reported. Curve in work_dir/tune/.",
    )
    tune.add_argument("config", help="YAML run config")
    _add_set(tune, "as the run was given them, so its capture is reused")
    tune.add_argument("--subclasses", type=positive_int, nargs="+", default=[2, 4, 8, 16])
    tune.add_argument("--betas", type=positive_float, nargs="+", default=[0.05, 0.1, 0.25, 0.5, 1.0])
    tune.add_argument("--taus", type=positive_float, nargs="+", default=[1.0, 2.0, 4.0])
    tune.add_argument("--steps", type=positive_int, default=500, help="optimiser steps per proxy student")
    tune.add_argument("--final-steps", type=positive_int, default=None,
                      help="optimiser steps of the finals (KD's tau, then LELP against KD, each on fresh seeds); "
                      "default: the student's own, train.epochs x batches per epoch (of the --fraction rows)")
    tune.add_argument("--keep", choices=("best", "last"), default="best",
                      help="score each proxy at its best validation evaluation (as `distill` keeps its best epoch) "
                      "or its last (for a student kept as it ends)")
    tune.add_argument("--evals", type=positive_int, default=10,
                      help="validation evaluations per proxy; it is scored at the best or the last (--keep)")
    tune.add_argument("--seeds", type=positive_int, default=3,
                      help="proxies per grid point, and as many fresh seeds for KD's finals and for the paired "
                      "LELP-vs-KD decision")
    tune.add_argument("--fraction", type=float, default=1.0, help="training rows the proxies see")
    tune.add_argument("--subclass-weights", type=float, nargs="+", default=None,
                      help="lambda values (1: the paper's LELP; 0: KD on the pooled C*S-output student, beta moot; "
                      f"default {DEFAULT_SUBCLASS_WEIGHT}, the library's, with train.divergence kl; another divergence "
                      "takes lambda = 1 only)")
    tune.add_argument("--capture", help="a capture of the teacher on its own inputs for task.train's rows, in order "
                                        "(when the teacher does not read the student's inputs)")
    tune.add_argument("--work-dir", help="override the config's work_dir")
    tune.set_defaults(func=_cmd_tune)


def _add_config_commands(sub) -> None:
    """``run`` (every stage of a config) and ``train`` (the stages up to the student's training)."""
    from .run import STAGES

    for name, until, help_text, description in (
        ("run", "report", "the whole path from one YAML config: capture -> fit -> targets -> train -> report",
         "Runs every stage of a config file (see examples/configs/) that is not finished, or whose settings or "
         "input changed since it ran (each stage says: started, resumed, skipped (unchanged) or redone: what "
         "changed); each stage is resumable after a kill. Writes report.md/report.json in the config's work_dir."),
        ("train", "train", "train the student of a YAML run config (the stages before it first, when not finished)",
         "lelp-fast run CONFIG --until train: capture, fit and targets when missing, then the distillation loop "
         "(checkpointed every epoch, resumable, early stopping, TensorBoard, report)."),
    ):
        cmd = sub.add_parser(name, help=help_text, description=description)
        cmd.add_argument("config", help="YAML run config")
        if name == "run":
            cmd.add_argument("--until", choices=STAGES, default="report", help="the last stage to run (default: all)")
        cmd.add_argument("--redo", choices=STAGES, help="redo this stage and every stage after it, even if "
                         "unchanged (a stage whose settings or input changed is redone anyway)")
        cmd.add_argument("--work-dir", help="override the config's work_dir (relative paths: to the current directory)")
        _add_set(cmd)
        cmd.add_argument("--print-config", action="store_true",
                         help="print the validated config (defaults and --set applied) and exit")
        cmd.add_argument("--quiet", action="store_true", help="no progress bars")
        cmd.set_defaults(func=_cmd_run, until=until)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lelp-fast", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for add in (_add_demo, _add_fit, _add_inspect, _add_targets, _add_capture, _add_config_commands, _add_tune,
                _add_export, _add_teacher_outputs, _add_bench):
        add(sub)
    return parser


def _stdout_gone() -> bool:
    """Whether standard output's reader has gone; if so, it is pointed at /dev/null, where Python's
    flush at exit cannot fail."""
    try:
        sys.stdout.flush()
        return False
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return True


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the command's user reads it: what happened, without the library's source line."""
    return f"warning: {message}\n"


def main(argv: Optional[List[str]] = None) -> int:
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    finished, formatwarning = False, warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        code = args.func(args)
        finished = True
        return code
    except CommandError as exc:
        print(exc, file=sys.stderr)
        raise
    except BrokenPipeError as exc:
        if not _stdout_gone():
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 1  # the reader stopped (`| head`): nothing to say, and no one to say it to
    except (ValueError, RuntimeError, OSError) as exc:  # one line, never a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: what was finished is kept; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        _end_process_group(finished)
        warnings.formatwarning = formatwarning


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
