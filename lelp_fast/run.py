"""``lelp-fast run config.yaml``: the whole user's path from one config, finished stages skipped.

Stages and what marks them done (each is also resumable after a kill on its own):
capture (``capture/train``, ``capture/val``: manifests) -> fit (``projector.safetensors``) ->
targets (``targets``: manifest) -> train (``student/report.json``) -> report (``report.md`` and
``report.json`` at the top of ``work_dir``: the student's test metrics next to the teacher's).
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Callable, Optional

from torch.utils.data import DataLoader

from .capture import CaptureSource, capture
from .config import ConfigError, RunConfig
from .io.locks import ExclusiveLock
from .offline import generate_targets, shards
from .projector import LELPProjector
from .train import TrainSettings, distill, evaluate, load_student

def load_task(cfg: RunConfig):
    """Calls the config's ``task.factory`` (``module:function``) with ``work_dir`` and its kwargs."""
    module_name, func_name = cfg.task.factory.split(":")
    try:
        factory = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"task.factory: cannot import {cfg.task.factory} ({exc})") from None
    try:
        return factory(cfg.work_dir, **cfg.task.kwargs)
    except TypeError as exc:
        raise ConfigError(f"task.kwargs: {exc}") from None


STAGES = ("capture", "fit", "targets", "train", "report")


def run(cfg: RunConfig, *, until: str = "report", progress: bool = False,
        log: Callable[[str], None] = print) -> Optional[dict]:
    """Runs every stage up to ``until`` that is not finished yet; returns the final report (None when
    stopped before it)."""
    if until not in STAGES:
        raise ValueError(f"until must be one of {STAGES}, got {until!r}")
    last = STAGES.index(until)
    os.makedirs(cfg.work_dir, exist_ok=True)
    with ExclusiveLock(os.path.join(cfg.work_dir, ".lock-run"), f"work_dir {cfg.work_dir}"):
        task = load_task(cfg)
        paths = {name: os.path.join(cfg.work_dir, name) for name in
                 ("capture/train", "capture/val", "projector.safetensors", "targets", "student")}
        for split in ("train", "val"):
            log(f"[capture] {split}: {paths['capture/' + split]}")
            c = cfg.capture
            capture(task.teacher, DataLoader(getattr(task, split), batch_size=c.batch_size, shuffle=False),
                    paths["capture/" + split], layer=c.layer, head=c.head, dtype=c.dtype,
                    batches_per_shard=c.batches_per_shard, device=c.device, autocast=c.autocast, progress=progress)
        if last < STAGES.index("fit"):
            return None
        projector = _fit(cfg, paths, log, progress)
        if last < STAGES.index("targets"):
            return None
        log(f"[targets] {paths['targets']}")
        t = cfg.targets
        generate_targets(projector, paths["capture/train"], paths["targets"], format=t.format, dtype=t.dtype,
                         compact=t.compact, beta=t.beta, tau=t.tau, chunk_bytes=int(t.chunk_mb * (1 << 20)),
                         backend=t.backend, device=t.device, progress=progress)
        if last < STAGES.index("train"):
            return None
        log(f"[train] {paths['student']}")
        k = projector.n_outputs
        val_logits = CaptureSource(paths["capture/val"]).tensors()["teacher_logits"]
        compact = (t.beta or projector.beta, t.tau or projector.tau) if t.compact else None
        trained = distill(task.make_student(k), task.train, paths["targets"], paths["student"],
                          num_classes=projector.num_classes, n_subclasses=projector.n_subclasses, val_data=task.val,
                          val_teacher_logits=val_logits, settings=TrainSettings(**cfg.train.model_dump()),
                          compact_temperatures=compact, progress=progress)
        if last < STAGES.index("report"):
            return None
        return _report(cfg, task, projector, trained, paths, log)


def _fit(cfg: RunConfig, paths: dict, log, progress) -> LELPProjector:
    path = paths["projector.safetensors"]
    if os.path.exists(path):
        log(f"[fit] {path} exists: loaded")
        return LELPProjector.load(path)
    f = cfg.fit
    source = CaptureSource(paths["capture/train"])
    head = source.head()
    log(f"[fit] S={f.subclasses}, beta={f.beta} -> {path}")
    projector = LELPProjector(f.subclasses, beta=f.beta, tau=f.tau, null_space=f.null_space, rotate=f.rotate,
                              standardize=f.standardize, seed=f.seed, assign=f.assign, method=f.method,
                              oversampling=f.oversampling, passes=f.passes, iteration_sample=f.iteration_sample)
    projector.fit(source, head_weight=None if head is None else head[0], head_bias=None if head is None else head[1],
                  chunk_bytes=int(f.chunk_mb * (1 << 20)), nan_policy=f.nan_policy, progress=progress,
                  device=f.device, checkpoint=os.path.join(cfg.work_dir, "fit.ckpt"),
                  checkpoint_every=f.checkpoint_every, resume=True)  # a killed fit continues
    projector.save(path)
    return projector


def _report(cfg, task, projector, trained: dict, paths: dict, log) -> dict:
    """The student's and the teacher's test metrics, next to the training summary."""
    student = load_student(task.make_student(projector.n_outputs), paths["student"])
    test_teacher = _teacher_logits(task.teacher, task.test, cfg.capture.device)
    student_test = evaluate(student, task.test, projector.num_classes, projector.n_subclasses,
                            teacher_logits=test_teacher, tau=cfg.train.tau)
    labels = [int(y) for _, y in task.test]
    teacher_acc = sum(int(p == y) for p, y in zip(test_teacher.argmax(1).tolist(), labels)) / max(len(labels), 1)
    report = {"config": cfg.model_dump(), "teacher_test_accuracy": teacher_acc, "student_test": student_test,
              "best_epoch": trained["best"], "epochs_run": trained["epochs_run"],
              "student_report": os.path.join("student", "report.md")}
    md = (f"# lelp_fast run: {cfg.work_dir}\n\n"
          f"| model | test accuracy | agreement | predictive KL |\n|---|---|---|---|\n"
          f"| teacher | {teacher_acc:.4f} | 1 | 0 |\n"
          f"| student (LELP, S={projector.n_subclasses}, beta={projector.beta}) | {student_test['accuracy']:.4f} | "
          f"{student_test['agreement']:.4f} | {student_test['predictive_kl']:.4f} |\n\n"
          f"Training curves: student/report.md, student/curves.png.\n")
    shards.write_atomically(os.path.join(cfg.work_dir, "report.md"), md.encode())
    shards.write_atomically(os.path.join(cfg.work_dir, "report.json"),
                            (json.dumps(report, indent=1, sort_keys=True) + "\n").encode())
    log(f"[report] {os.path.join(cfg.work_dir, 'report.md')}")
    return report


def _teacher_logits(teacher, data, device):
    import torch

    teacher = teacher.to(device).eval()
    with torch.no_grad():
        return torch.cat([teacher(x.to(device)).float().cpu() for x, _ in DataLoader(data, batch_size=512)])
