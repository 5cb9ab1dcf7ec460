"""``lelp-fast run config.yaml``: the whole user's path from one config; a rerun redoes what changed.

Stages and their outputs (each is also resumable after a kill on its own):
capture (``capture/train``, ``capture/val``) -> fit (``projector.safetensors``) -> targets
(``targets/``) -> train (``student/``) -> report (``report.md`` and ``report.json`` at the top of
``work_dir``: the student's test metrics next to the teacher's).

Each stage records in ``work_dir/.stages/<stage>.json`` the settings its output was made from and
the digests of its inputs (the previous stages' outputs). A rerun skips a stage whose record
matches, and redoes one whose settings or inputs changed, printing what changed; a redone stage's
new output changes the input of the stages after it, so they are redone too. A finished output
whose files were removed or cut, or that a later stage found corrupt where it read it, is repaired
(capture, targets: the damaged shards rewritten) or made again by the next run.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
import shutil
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader

from .capture import CaptureSource, capture
from .config import ConfigError, RunConfig
from .fit.engine import StaleCheckpointError
from .io.integrity import tensors_sha256
from .io.locks import ExclusiveLock
from .offline import generate_targets, provenance, shards
from .offline.dataset import IGNORE_INDEX
from .offline.manifest import MANIFEST, projector_digest
from .projector import LELPProjector
from .train import TrainSettings, distill, evaluate, load_student
from .reference import resolve_subclass_weight
from .train.loop import CHECKPOINT as TRAIN_CHECKPOINT, EXECUTION_ONLY as TRAIN_EXECUTION_ONLY, data_digest, \
    trained_subclass_weight


def load_task(cfg: RunConfig):
    """Calls the config's ``task.factory`` (``module:function``) with ``work_dir`` and its kwargs."""
    module_name, func_name = cfg.task.factory.split(":")
    try:
        factory = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"task.factory: cannot import {cfg.task.factory} ({exc}); the module must be importable "
                          "from where lelp-fast runs (installed, or on PYTHONPATH)") from None
    try:
        return factory(cfg.work_dir, **cfg.task.kwargs)
    except TypeError as exc:
        raise ConfigError(f"task.kwargs: {exc}") from None


STAGES = ("capture", "fit", "targets", "train", "baseline", "report")
RECORDS = ".stages"  # work_dir/.stages/<stage>.json: what each stage's output was made from

# Keys that change how fast, not what, a stage computes: editing them reuses the stage's output.
EXECUTION_ONLY = {"capture": ("device",), "fit": ("chunk_mb", "checkpoint_every", "device"),
                  "targets": ("chunk_mb", "device", "backend"),
                  "train": TRAIN_EXECUTION_ONLY}


# Stages whose function, run over its finished output, verifies every file and rewrites the damaged
# ones (capture, generate_targets); the other stages' damaged outputs are made again.
REPAIRS_IN_PLACE = ("capture", "targets")


# Files of a training directory that are not its output (student.safetensors and report.json are):
# the resume checkpoint, the logs and the plot. Removed to free space, they cost no retraining.
NOT_OUTPUTS = frozenset((TRAIN_CHECKPOINT, "tensorboard", "curves.png", "report.md"))


ADDED_INPUTS = ("data", "test", "student_report")  # inputs first recorded in session 66


def _from_before_session_66(made_from: Optional[dict], wanted: dict) -> Optional[dict]:
    """A record as this version writes it. Records from before session 66 lack the fingerprints of
    the task's rows (capture's ``data``, the report's ``test`` and ``student_report``), taken as
    today's, and may hold train.subclass_weight set to its default's value, which is now recorded as
    unset: an upgrade redoes no stage (a capture can take hours)."""
    if made_from is None:
        return None
    inputs = {**{k: v for k, v in wanted.get("inputs", {}).items() if k in ADDED_INPUTS},
              **made_from.get("inputs", {})}
    settings = dict(made_from.get("settings", {}))
    if isinstance(settings.get("train"), dict):
        settings["train"] = _default_weight_unset(settings["train"])
    return {**made_from, "settings": settings, "inputs": inputs}


def _default_weight_unset(train: dict, n_subclasses: Optional[int] = None) -> dict:
    """A train section with subclass_weight set to the λ its None stands for (or any λ at S = 1,
    where there is no subclass part to weight) recorded as None, as distill takes them as one."""
    weight = train.get("subclass_weight")
    if weight is None or not (n_subclasses == 1 or weight == resolve_subclass_weight(None, train.get("divergence", "kl"))):
        return train
    return {**train, "subclass_weight": None}


class StageLog:
    """Per stage: skip it when its settings and inputs are those its output was made from, else
    (re)do it, saying why ("redone: fit.beta 0.25 -> 0.05"); records each finished output's digest
    and its files' sizes, so that a skipped stage whose files were removed or cut is made again."""

    def __init__(self, work_dir: str, log: Callable[[str], None], redo_from: Optional[str] = None):
        self.work_dir, self.directory, self.log = work_dir, os.path.join(work_dir, RECORDS), log
        self.forced = set(STAGES[STAGES.index(redo_from):]) if redo_from else set()
        self.outputs: dict = {}

    def _path(self, stage: str) -> str:
        return os.path.join(self.directory, stage + ".json")

    def needed(self, stage: str, settings: dict, inputs: dict, outputs: Sequence[str],
               scratch: Sequence[str] = (), output_digest: Optional[Callable[[], object]] = None) -> bool:
        """True when ``stage`` must run; a changed or forced stage's old ``outputs`` and ``scratch``
        files (a checkpoint a finished stage removes) are removed first. ``output_digest`` gives the
        digest of the output on disk now, as ``finish`` was given it: a finished output replaced or
        edited since (a projector refitted by hand, another student copied in) is made again, not
        taken with the record of the one it replaced."""
        wanted = provenance.record(settings, inputs)
        stored = provenance.read(self._path(stage))
        made_from = None if stored is None else _from_before_session_66(stored.get("made_from"), wanted)
        if stage in self.forced:
            why = "redone: forced (--redo)"
        elif made_from is not None and made_from != wanted:
            why = "redone: " + "; ".join(provenance.changes(made_from, wanted))
        elif made_from is None:
            why = "started"
        elif not stored.get("done"):
            why = "resumed"  # a killed run: the stage continues its own partial output
        elif not all(os.path.exists(p) for p in outputs):
            why = "redone: its output is missing"
        elif damage := stored.get("damaged") or self._damage(stored):
            path, problem = damage
            why = f"{'repaired' if _repairable(stage, path) else 'redone'}: {problem}"
        elif output_digest is not None and (replaced := _replaced(output_digest, stored.get("output"))):
            why = f"redone: {replaced}"
        else:
            if "files" not in stored or stored.get("made_from") != made_from:  # an older record, brought up to date
                provenance.write(self._path(stage), {**stored, "made_from": made_from,
                                                     "files": stored.get("files") or self._listing(outputs)})
            self.log(f"[{stage}] skipped (unchanged)")
            return False
        if why.startswith("redone"):
            _remove([*outputs, *scratch])
        self.outputs[stage] = outputs
        provenance.write(self._path(stage), {"made_from": wanted, "done": False})
        self.log(f"[{stage}] {why}")
        return True

    def _damage(self, stored: dict) -> Optional[Tuple[str, str]]:
        """The first file of a finished output that is not as its stage wrote it (removed, or of
        another size) and why, or None; a cheap look (no file is read: checksums are checked where
        files are read)."""
        for name, size in stored.get("files", {}).items():
            if NOT_OUTPUTS.intersection(name.split(os.sep)):  # listed by a record before session 66
                continue
            path = os.path.join(self.work_dir, name)
            if not os.path.isfile(path):
                return path, f"{path} is missing"
            if os.path.getsize(path) != size:
                return path, f"{path} has {os.path.getsize(path)} bytes, {size} when it was written"
        return None

    def finish(self, stage: str, output_digest) -> None:
        stored = provenance.read(self._path(stage))
        provenance.write(self._path(stage), {**stored, "done": True, "output": output_digest,
                                             "files": self._listing(self.outputs.get(stage, ()))})

    def _listing(self, outputs: Sequence[str]) -> dict:
        """Sizes of the files of ``outputs`` (files, or directories walked), by path under work_dir;
        hidden files (locks) and a training directory's by-products (NOT_OUTPUTS) left out."""
        paths = []
        for output in outputs:
            if os.path.isfile(output):
                paths.append(output)
            for root, dirs, files in os.walk(output):
                dirs[:] = [d for d in dirs if not d.startswith(".") and d not in NOT_OUTPUTS]
                paths += [os.path.join(root, f) for f in files if not f.startswith(".") and f not in NOT_OUTPUTS]
        return {os.path.relpath(p, self.work_dir): os.path.getsize(p) for p in sorted(paths)}

    def mark_damaged(self, error: str) -> Optional[str]:
        """Where ``error`` (a reader's message) names a file of a finished stage's output, records that
        output as damaged, so that the next run repairs or redoes its stage; returns that stage."""
        for stage in STAGES:
            stored = provenance.read(self._path(stage))
            for name in (stored or {}).get("files", {}) if (stored or {}).get("done") else ():
                path = os.path.join(self.work_dir, name)
                if _names(error, path) or _names(error, os.path.abspath(path)):
                    provenance.write(self._path(stage), {**stored, "damaged": [path, f"{path} was found damaged"]})
                    return stage
        return None

    def output(self, stage: str):
        return provenance.read(self._path(stage))["output"]


def _replaced(output_digest: Callable[[], object], recorded) -> Optional[str]:
    """Why the finished output on disk is not the one recorded (another digest, or unreadable), or None."""
    try:
        digest = output_digest()
    except (ValueError, OSError, KeyError) as exc:
        return f"its output cannot be read ({str(exc).split('; ')[0]})"
    return None if digest == recorded else "its output is not the one recorded (replaced or edited since)"


def _repairable(stage: str, path: str) -> bool:
    """Whether the next run repairs ``stage``'s output in place for its damaged file ``path``; an
    unreadable manifest is no finished output to repair: the stage starts over."""
    return stage in REPAIRS_IN_PLACE and os.path.basename(path) != MANIFEST


def _names(error: str, path: str) -> bool:
    """Whether ``error`` names ``path`` itself, not a longer path ending in it (a work_dir named
    "baseline" holds baseline/baseline/student/..., which ends in baseline/student/...)."""
    return re.search(r"(?<![\w./-])" + re.escape(path) + r"(?![\w/-]|\.\w)", error) is not None


class DamagedOutputError(ValueError):
    """A stage read a damaged file of an earlier stage's output; the next run repairs or redoes that stage."""


def damaged_output_error(stages: StageLog, exc: Exception) -> Optional[DamagedOutputError]:
    """Where ``exc`` (a reader's error) is about a damaged file of a finished stage's output: that is
    recorded against the stage, and the error to raise says the next run mends it (the reader's own
    advice, to rerun the command that wrote the file, is for outside a run); else None."""
    damaged = isinstance(exc, FileNotFoundError) or any(w in str(exc) for w in ("corrupt", "missing", "truncated"))
    stage = stages.mark_damaged(str(exc)) if damaged else None
    if stage is None:
        return None
    problem = str(exc).split("; rerun")[0].split("; remove")[0]
    path = provenance.read(stages._path(stage))["damaged"][0]
    fix = "repairs" if _repairable(stage, path) else "redoes"
    return DamagedOutputError(f"{problem}; run `lelp-fast run` again: it {fix} the {stage} stage")


def _run_stage(step, cfg, task, stages: StageLog, paths, state, progress) -> None:
    """Runs one stage; a damaged file of an earlier stage's output that it reads (a checksum that
    fails, a shard removed) is recorded against that stage (``damaged_output_error``)."""
    try:
        step(cfg, task, stages, paths, state, progress)
    except (ValueError, OSError) as exc:
        error = damaged_output_error(stages, exc)
        if error is None:
            raise
        raise error from exc


def _remove(paths: Sequence[str]) -> None:
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.unlink(path)


def _section(cfg: RunConfig, name: str) -> dict:
    """A config section without its execution-only keys (see EXECUTION_ONLY), the train section's
    default λ as unset (``_default_weight_unset``)."""
    values = getattr(cfg, name).model_dump()
    section = {k: v for k, v in values.items() if k not in EXECUTION_ONLY.get(name, ())}
    return _default_weight_unset(section, cfg.fit.subclasses) if name == "train" else section


def run(cfg: RunConfig, *, until: str = "report", progress: bool = False, redo: Optional[str] = None,
        log: Callable[[str], None] = print) -> Optional[dict]:
    """Runs the stages up to ``until``; a stage whose settings and input are those of its recorded
    output is skipped, every other one (and ``redo`` and the stages after it) is (re)done.
    Returns the final report (None when stopped before it)."""
    for name, value in (("until", until), ("redo", redo)):
        if value is not None and value not in STAGES:
            raise ValueError(f"{name} must be one of {STAGES}, got {value!r}")
    last = STAGES.index(until)
    if redo is not None and STAGES.index(redo) > last:
        raise ValueError(f"redo {redo!r} comes after until {until!r}: that stage would not run")
    os.makedirs(cfg.work_dir, exist_ok=True)
    with ExclusiveLock(os.path.join(cfg.work_dir, ".lock-run"), f"work_dir {cfg.work_dir}"):
        for directory in (cfg.work_dir, os.path.join(cfg.work_dir, RECORDS)):  # a killed run's (we hold the lock)
            shards.remove_stale_temp_files(directory, 0)
        log(f"[task] {cfg.task.factory}: building the teacher, data and student (a task may train its teacher now)")
        task = load_task(cfg)
        stages = StageLog(cfg.work_dir, log, redo)
        paths = {name: os.path.join(cfg.work_dir, name) for name in
                 ("capture", "projector.safetensors", "fit.ckpt", "targets", "student", "baseline", "report.md",
                  "report.json")}
        steps = (_capture_stage, _fit_stage, _targets_stage, _train_stage, _baseline_stage, _report_stage)
        state: dict = {}
        for step in steps[:last + 1]:
            _run_stage(step, cfg, task, stages, paths, state, progress)
        return state.get("report")


def _capture_stage(cfg, task, stages: StageLog, paths, state, progress) -> None:
    settings = {"task": cfg.task.model_dump(), "capture": _section(cfg, "capture")}
    # the rows too (a TensorDataset by every byte; train.loop.data_digest): data edited under the same
    # task.kwargs is captured again
    inputs = {"teacher": tensors_sha256(task.teacher.state_dict()),
              "data": {split: data_digest(getattr(task, split)) for split in ("train", "val")}}

    def manifests():
        return {split: provenance.file_digest(os.path.join(paths["capture"], split, MANIFEST))
                for split in ("train", "val")}

    if stages.needed("capture", settings, inputs, [paths["capture"]], output_digest=manifests):
        c = cfg.capture
        for split in ("train", "val"):
            capture(task.teacher, DataLoader(getattr(task, split), batch_size=c.batch_size, shuffle=False),
                    os.path.join(paths["capture"], split), layer=c.layer, head=c.head, dtype=c.dtype,
                    batches_per_shard=c.batches_per_shard, device=c.device, autocast=c.autocast, progress=progress)
        stages.finish("capture", manifests())


def _fit_stage(cfg, task, stages: StageLog, paths, state, progress) -> None:
    path = paths["projector.safetensors"]
    inputs = {"capture": stages.output("capture")["train"]}

    def loaded():
        state["projector"] = LELPProjector.load(path)
        return projector_digest(state["projector"])

    if not stages.needed("fit", {"fit": _section(cfg, "fit")}, inputs, [path], scratch=[paths["fit.ckpt"]],
                         output_digest=loaded):
        return
    f = cfg.fit
    source = CaptureSource(os.path.join(paths["capture"], "train"))
    projector = LELPProjector(f.subclasses, beta=f.beta, tau=f.tau, null_space=f.null_space, rotate=f.rotate,
                              standardize=f.standardize, seed=f.seed, assign=f.assign, method=f.method,
                              oversampling=f.oversampling, passes=f.passes, iteration_sample=f.iteration_sample)

    def fit():  # a killed fit continues; the capture's stored head is used
        projector.fit(source, chunk_bytes=int(f.chunk_mb * (1 << 20)), nan_policy=f.nan_policy, progress=progress,
                      device=f.device, checkpoint=paths["fit.ckpt"], checkpoint_every=f.checkpoint_every, resume=True)

    try:
        fit()
    except StaleCheckpointError:  # the stage's settings and inputs are the record's: fit.chunk_mb, or the library
        stages.log(f"[fit] {paths['fit.ckpt']} was written otherwise (another fit.chunk_mb, or another version): "
                   "starting the fit over")
        os.unlink(paths["fit.ckpt"])
        fit()
    projector.save(path)
    stages.finish("fit", projector_digest(projector))
    state["projector"] = projector


def _targets_stage(cfg, task, stages: StageLog, paths, state, progress) -> None:
    inputs = {"fit": stages.output("fit"), "capture": stages.output("capture")["train"]}
    settings = _section(cfg, "targets")
    if cfg.targets.compact:  # compact targets hold u and the logits: β and τ are the train stage's settings
        settings.update(beta=None, tau=None)  # (as unset, so work_dirs of the default are not redone)
    manifest = os.path.join(paths["targets"], MANIFEST)
    if stages.needed("targets", {"targets": settings}, inputs, [paths["targets"]],
                     output_digest=lambda: provenance.file_digest(manifest)):
        t = cfg.targets
        chunk_bytes = _recorded_chunk_bytes(paths["targets"], int(t.chunk_mb * (1 << 20)))
        generate_targets(state["projector"], os.path.join(paths["capture"], "train"), paths["targets"],
                         format=t.format, dtype=t.dtype, compact=t.compact, beta=t.beta, tau=t.tau,
                         chunk_bytes=chunk_bytes, backend=t.backend, device=t.device, progress=progress)
        stages.finish("targets", provenance.file_digest(manifest))


def _recorded_chunk_bytes(directory: str, configured: int) -> int:
    """The chunk size a partial or finished targets output was written with (a stage resumed or
    repaired continues its own shards: targets.chunk_mb is execution-only, so an edit of it alone
    does not redo the stage), else ``configured``."""
    from .offline.manifest import recorded_settings

    try:
        recorded = recorded_settings(directory) if os.path.isdir(directory) else None
    except ValueError:  # an unreadable record: generate_targets names it
        recorded = None
    return int(recorded.get("chunk_bytes", configured)) if recorded else configured


def _val_teacher_logits(paths: dict, state: dict):
    """The teacher's logits of the validation rows, read once for the student and the KD baseline."""
    if "val_logits" not in state:
        state["val_logits"] = CaptureSource(os.path.join(paths["capture"], "val")).tensors()["teacher_logits"]
    return state["val_logits"]


def _temperatures(cfg: RunConfig, projector: LELPProjector) -> tuple:
    """The (β, τ) the stored targets hold: the targets section's, else the projector's."""
    t = cfg.targets
    return (t.beta or projector.beta, t.tau or projector.tau)


def _train_stage(cfg, task, stages: StageLog, paths, state, progress) -> None:
    projector = state["projector"]
    settings = {"task": cfg.task.model_dump(), "train": _section(cfg, "train")}
    compact = _temperatures(cfg, projector) if cfg.targets.compact else None
    if compact:  # applied as the loop reads compact targets: not in the targets' manifest, so not its input
        settings["compact_temperatures"] = {"beta": compact[0], "tau": compact[1]}
    inputs = {"targets": stages.output("targets"), "capture": stages.output("capture")["val"]}
    torch.manual_seed(cfg.train.seed)  # the initialisation seed the KD baseline's student gets too
    student = task.make_student(projector.n_outputs)

    def loaded():  # into a copy: a student trained again starts from the seeded initialisation
        state["student"] = load_student(copy.deepcopy(student), paths["student"])
        return tensors_sha256(state["student"].state_dict())

    if stages.needed("train", settings, inputs, [paths["student"]], output_digest=loaded):
        val_logits = _val_teacher_logits(paths, state)
        distill(student, task.train, paths["targets"], paths["student"], num_classes=projector.num_classes,
                n_subclasses=projector.n_subclasses, val_data=task.val, val_teacher_logits=val_logits,
                settings=TrainSettings(**cfg.train.model_dump()), compact_temperatures=compact, progress=progress,
                log=stages.log)
        stages.finish("train", tensors_sha256(student.state_dict()))
        state["student"] = student


def _baseline_stage(cfg, task, stages: StageLog, paths, state, progress) -> None:
    """Vanilla KD on the same rows, settings and seed as the student (``report.kd_baseline``)."""
    from .train.baseline import kd_baseline

    if not cfg.report.kd_baseline:
        stages.log("[baseline] off (report.kd_baseline: false)")
        return
    projector = state["projector"]
    train = {**_section(cfg, "train"), "subclass_weight": None}  # no subclasses at S = 1: recorded as unset
    settings = {"task": cfg.task.model_dump(), "train": train, "tau": _temperatures(cfg, projector)[1]}
    inputs = {"capture": stages.output("capture")}
    student_dir = os.path.join(paths["baseline"], "student")

    def loaded():
        state["kd_student"] = load_student(task.make_student(projector.num_classes), student_dir)
        return tensors_sha256(state["kd_student"].state_dict())

    if stages.needed("baseline", settings, inputs, [paths["baseline"]], output_digest=loaded):
        val_logits = _val_teacher_logits(paths, state)
        trained = kd_baseline(task.make_student, task.train, os.path.join(paths["capture"], "train"),
                              paths["baseline"], num_classes=projector.num_classes,
                              settings=TrainSettings(**cfg.train.model_dump()), tau=settings["tau"],
                              val_data=task.val, val_teacher_logits=val_logits, progress=progress, log=stages.log)
        state["kd_student"] = trained["student"]
        stages.finish("baseline", tensors_sha256(state["kd_student"].state_dict()))


def _report_stage(cfg, task, stages: StageLog, paths, state, progress) -> None:
    inputs = {"train": stages.output("train"), "fit": stages.output("fit"),
              "baseline": stages.output("baseline") if cfg.report.kd_baseline else None,
              "test": data_digest(task.test),
              # its best epoch and curves too: validation rows edited can change them, not the weights
              "student_report": provenance.file_digest(os.path.join(paths["student"], "report.json"))}
    settings = {"task": cfg.task.model_dump(), "targets": _section(cfg, "targets"), "train": _section(cfg, "train")}
    if stages.needed("report", settings, inputs, [paths["report.md"], paths["report.json"]],
                     output_digest=lambda: provenance.file_digest(paths["report.json"])):
        state["report"] = _report(cfg, task, state["projector"], state["student"], paths, state.get("kd_student"))
        stages.finish("report", provenance.file_digest(paths["report.json"]))
    else:
        state["report"] = provenance.read_json(paths["report.json"])


def _report(cfg, task, projector, student, paths: dict, kd_student=None) -> dict:
    """The student's and the teacher's test metrics (and KD's, with the difference), next to the
    training summary."""
    trained = provenance.read_json(os.path.join(paths["student"], "report.json"))
    test_teacher = _teacher_logits(task.teacher, task.test, cfg.capture.device)
    student_test = evaluate(student, task.test, projector.num_classes, projector.n_subclasses,
                            teacher_logits=test_teacher, tau=cfg.train.tau)
    labels = torch.tensor([int(y) for _, y in task.test], dtype=torch.int64)
    labelled = labels != IGNORE_INDEX  # as the students' accuracy: a row without a label is left out
    teacher_acc = float((test_teacher.argmax(1).cpu() == labels)[labelled].double().mean())
    beta, tau = _temperatures(cfg, projector)
    weight = trained_subclass_weight(TrainSettings(**cfg.train.model_dump()), projector.n_subclasses)
    report = {"config": cfg.model_dump(), "teacher_test_accuracy": teacher_acc, "student_test": student_test,
              "targets_beta": beta, "targets_tau": tau, "subclass_weight": weight,
              "best_epoch": trained["best"], "epochs_run": trained["epochs_run"],
              "student_report": os.path.join("student", "report.md")}
    md = (f"# lelp_fast run: {cfg.work_dir}\n\n"
          f"| model | test accuracy | agreement | predictive KL |\n|---|---|---|---|\n"
          f"| teacher | {teacher_acc:.4f} | 1 | 0 |\n"
          f"| student (LELP, S={projector.n_subclasses}, beta={beta}, targets tau={tau}, loss tau={cfg.train.tau}, "
          f"lambda={weight}) | {student_test['accuracy']:.4f} | "
          f"{student_test['agreement']:.4f} | {student_test['predictive_kl']:.4f} |\n")
    if kd_student is not None:
        from .train.baseline import baseline_markdown, compare_with_kd

        comparison = compare_with_kd(student, kd_student, task.test, num_classes=projector.num_classes,
                                     n_subclasses=projector.n_subclasses, tau=cfg.train.tau, teacher_logits=test_teacher)
        report["kd_baseline"] = comparison
        md += baseline_markdown(comparison)
    md += "\nTraining curves: student/report.md, student/curves.png.\n"
    shards.write_atomically(paths["report.md"], md.encode())
    shards.write_atomically(paths["report.json"], (json.dumps(report, indent=1, sort_keys=True) + "\n").encode())
    return report


def _teacher_logits(teacher, data, device):
    teacher = teacher.to(device).eval()
    with torch.no_grad():
        return torch.cat([teacher(x.to(device)).float().cpu() for x, _ in DataLoader(data, batch_size=512)])
