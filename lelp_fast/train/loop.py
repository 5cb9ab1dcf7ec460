"""Stage 4 of the user's path: a plain-PyTorch distillation loop over stored targets.

``distill`` trains a student on ``TargetsDataset(targets_dir, train_data)`` (the training inputs
joined to their stored LELP targets by row index) with the fused loss, evaluates it every epoch
(accuracy, and agreement / predictive KL against the teacher when its validation logits are
given), stops early when the validation accuracy has not improved for ``patience`` epochs, and
writes the best student, a checkpoint after every epoch, TensorBoard scalars and a final report
(``report.json``, ``report.md``, ``curves.png``) into ``out_dir``.

A run killed at any point and started again with the same arguments continues from its last
finished epoch and ends with the same student bytes: each epoch's shuffling is seeded by
``seed + epoch`` and the checkpoint holds the model, optimiser and history (its sha256 inside the
same file). Started again with other settings, targets or student architecture, it trains anew.
"""

from __future__ import annotations

import dataclasses
import io
import os
import math
import numbers
import shutil
import sys
from contextlib import nullcontext
from typing import Callable, Optional, Sequence

import torch
import xxhash
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from .._checks import check_choice, check_count, check_nonnegative, check_positive
from ..io.integrity import load_checked, save_checked, seal, unseal
from ..io.sources import content_digest
from ..io.locks import ExclusiveLock
from ..metrics import agreement, predictive_kl
from ..offline import TargetsDataset, provenance, shards
from ..offline.dataset import IGNORE_INDEX, GatheredBatches
from ..offline.manifest import MANIFEST, projector_digest
from ..ops.loss import distill_loss
from ..reference import canonical_divergence, class_logits, require_kl_for_subclass_weight, resolve_subclass_weight
from . import steps
from .report import write_report

CHECKPOINT = "checkpoint.pt"
STUDENT = "student.safetensors"


@dataclasses.dataclass
class TrainSettings:
    """How the student is trained (every field is a key of the config's ``train`` section)."""

    epochs: int = 10
    batch_size: int = 128  # the global batch: split across ranks under torchrun
    lr: float = 1e-3
    weight_decay: float = 0.0
    divergence: str = "kl"
    jsd_beta: float = 0.5
    tau: float = 1.0
    alpha: float = 0.0
    patience: Optional[int] = None
    seed: int = 0
    device: str = "auto"  # "auto": this rank's GPU when there is one, else the CPU
    tensorboard: bool = True
    mixed_precision: str = "no"  # "bf16" / "fp16": the student's forward under autocast
    grad_accumulation: int = 1  # batches per optimiser step
    max_grad_norm: Optional[float] = None  # clip the gradient's global norm to this
    lr_schedule: str = "constant"  # after the warm-up: "constant", "linear" or "cosine" decay to 0
    warmup_steps: int = 0  # optimiser steps of linear warm-up
    checkpoint_every_steps: Optional[int] = None  # also checkpoint mid-epoch, every this many steps
    log_every_steps: Optional[int] = None  # TensorBoard: loss, its soft and hard parts, lr per step
    # λ on the subclass part of KL(t‖q): 1 is the paper's LELP, 0 class-level KD on the pooled student;
    # None: the library's default, reference.DEFAULT_SUBCLASS_WEIGHT (0.1) with KL, 1 with another divergence
    subclass_weight: Optional[float] = None

    def check(self) -> None:
        for name in ("epochs", "batch_size", "grad_accumulation"):
            check_count(f"train.{name}", getattr(self, name))
        check_count("train.warmup_steps", self.warmup_steps, minimum=0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or not -2**63 <= self.seed < 2**64:
            raise ValueError(f"train.seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        for name in ("patience", "checkpoint_every_steps", "log_every_steps"):
            if getattr(self, name) is not None:
                check_count(f"train.{name}", getattr(self, name))
        for name in ("lr", "tau"):
            check_positive(f"train.{name}", getattr(self, name))
        check_nonnegative("train.alpha", self.alpha)
        if self.max_grad_norm is not None:
            check_positive("train.max_grad_norm", self.max_grad_norm)
        canonical_divergence(self.divergence, "train.divergence")  # "jsd" is accepted as "js"
        check_choice("train.mixed_precision", self.mixed_precision, tuple(steps.PRECISIONS))
        check_choice("train.lr_schedule", self.lr_schedule, steps.SCHEDULES)
        if self.subclass_weight is not None:
            check_nonnegative("train.subclass_weight", self.subclass_weight)  # 0: KD, 1: LELP
            require_kl_for_subclass_weight(self.subclass_weight, self.divergence, "train.subclass_weight")


def evaluate(student: nn.Module, data, num_classes: int, n_subclasses: int, *, teacher_logits=None,
             tau: float = 1.0, batch_size: int = 512, device="cpu", name: str = "data") -> dict:
    """Accuracy of the class logits pooled at the loss's ``tau`` on ``data`` ((x, y) items) over its
    labelled rows (-100 marks a row without a label); with the teacher's logits for the same rows,
    also top-1 agreement and predictive KL(teacher ‖ student). ``name`` names ``data`` in errors."""
    if teacher_logits is not None:
        rows = len(data) if hasattr(data, "__len__") else None
        check_teacher_logits(f"{name}'s teacher_logits", teacher_logits, rows, num_classes, name)
    student.eval()
    outs, labels = [], []
    with torch.no_grad():
        for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
            labels.append(class_labels(name, torch.as_tensor(y), num_classes, first_row=len(labels) * batch_size))
            outs.append(student(x.to(device)).float().cpu())
    s = torch.cat(outs)
    y = torch.cat(labels)
    labelled = y != IGNORE_INDEX
    if not bool(labelled.any()):
        raise ValueError(f"{name} has no labelled row (every label is {IGNORE_INDEX}): no accuracy to measure")
    pooled = class_logits(s, num_classes, n_subclasses, tau)
    result = {"accuracy": float((pooled.argmax(1) == y)[labelled].double().mean())}
    if teacher_logits is not None:
        result["agreement"] = agreement(teacher_logits, s, tau)
        result["predictive_kl"] = predictive_kl(teacher_logits, s, tau)
    return result


def class_labels(what: str, y: torch.Tensor, num_classes: int, first_row: int = 0) -> torch.Tensor:
    """``y`` as int64 class indices an accuracy can count: in [0, C), or IGNORE_INDEX. A label outside
    is never predicted, so the accuracy would fall without a word; a float label must be a whole
    number. ``first_row``: the data's row of y[0], for the error."""
    whole = y.round() == y if y.dtype.is_floating_point else torch.ones_like(y, dtype=torch.bool)
    bad = torch.nonzero(~whole | ((y != IGNORE_INDEX) & ((y < 0) | (y >= num_classes)))).flatten()
    if bad.numel():
        row = int(bad[0])
        raise ValueError(f"{what} row {first_row + row} has label {y[row].item()}, outside the student's classes "
                         f"[0, {num_classes - 1}] (or {IGNORE_INDEX}: no label)")
    return y.long()


def check_data_labels(name: str, data, num_classes: int) -> None:
    """Before training: a TensorDataset's labels, else the first batch's (a systematic error shows
    there; evaluate checks every validation row after each epoch, the loss every training row)."""
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        class_labels(name, data.tensors[1], num_classes)
    elif data is not None:
        _, y = next(iter(DataLoader(data, batch_size=512, shuffle=False)))
        class_labels(name, torch.as_tensor(y), num_classes)


def check_teacher_logits(name: str, teacher_logits, n_rows: Optional[int], num_classes: int, data: str) -> None:
    """The teacher's class logits of ``data``'s rows: one row per row, one column per class. The
    metrics take C from their width, so K-wide logits gave an agreement of the unpooled student."""
    shape = tuple(teacher_logits.shape)
    if len(shape) != 2 or shape[1] != num_classes or (n_rows is not None and shape[0] != n_rows):
        rows = "N" if n_rows is None else n_rows
        raise ValueError(f"{name} has shape {shape}; expected ({rows}, {num_classes}): the teacher's class "
                         f"logits, one row per row of {data}")


@dataclasses.dataclass
class OnlineTargets:
    """Targets computed in the loss from a capture's stored embeddings (and teacher logits) with a
    fitted projector, instead of read from a targets directory."""

    projector: "object"
    capture_dir: str


def distill(
    student: nn.Module,
    train_data,
    targets: "str | OnlineTargets",
    out_dir: str,
    *,
    num_classes: int,
    n_subclasses: int,
    val_data=None,
    val_teacher_logits: Optional[torch.Tensor] = None,
    settings: Optional[TrainSettings] = None,
    compact_temperatures: Optional[tuple] = None,
    check_labels: bool = True,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Trains ``student`` (inputs -> C*S logits); returns the report (dict).

    ``targets`` is a targets directory (``generate_targets``; rows in ``train_data``'s order), or
    :class:`OnlineTargets` to compute them in the fused loss from a capture's embeddings.
    ``compact_temperatures`` = (β, τ) turns compact targets (``u`` and teacher logits) into log-targets.
    ``check_labels``: refuse ``train_data`` whose labels differ from those the targets (or capture)
    store for its rows (another order, a filtered copy); False for labels changed on purpose.

    A finished ``out_dir`` made with the same settings, targets, student architecture and data
    (:func:`data_digest`) is not trained again: its verified weights are loaded into ``student``
    and its report returned. When any of them changed, the old outputs are removed and the student
    is trained again (``log`` says what changed); a checkpoint of a killed run is resumed only when
    it was made the same way.
    """
    settings = settings or TrainSettings()
    settings.check()
    if val_data is None and settings.patience is not None:
        raise ValueError("train.patience (early stopping) needs val_data: it stops on the validation accuracy")
    if val_data is None and val_teacher_logits is not None:
        raise ValueError("val_teacher_logits was given without val_data: pass the validation rows they are the "
                         "teacher's logits of")
    steps.resolve_device(settings.device)  # a device this machine lacks, named before any work
    check_data_labels("train_data", train_data, num_classes)
    check_data_labels("val_data", val_data, num_classes)
    if val_teacher_logits is not None:
        check_teacher_logits("val_teacher_logits", val_teacher_logits,
                             len(val_data) if hasattr(val_data, "__len__") else None, num_classes, "val_data")
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    parallel = steps.DataParallel()  # under torchrun: rank 0 writes, every rank trains its share
    lead = parallel.rank == 0
    log = log if lead else (lambda line: None)
    lock = ExclusiveLock(os.path.join(out_dir, ".lock"), f"training directory {out_dir}") if lead else nullcontext()
    with lock:
        if lead:  # a killed run's temp files (a checkpoint's can be the model and optimiser's size)
            shards.remove_stale_temp_files(out_dir, 0)
        data, loss_fn, targets_digest = _training_data(train_data, targets, num_classes, n_subclasses, settings,
                                                       compact_temperatures, check_labels)
        inputs = {"targets": targets_digest, "student": _architecture(student), "train_data": data_digest(train_data),
                  "val_data": data_digest(val_data), "val_teacher_logits": data_digest(val_teacher_logits)}
        made_from = provenance.record(_result_settings(settings, num_classes, n_subclasses, compact_temperatures),
                                      inputs)
        finished = _reuse_finished(student, out_dir, made_from, log) if lead else None
        parallel.barrier()  # the lead has removed stale outputs, or found the finished run
        if not lead:
            finished = _reuse_finished(student, out_dir, made_from, log, remove=False)
        if finished is not None:
            return finished
        run = _Run(student, data, loss_fn, out_dir, num_classes, n_subclasses, settings, val_data,
                   val_teacher_logits, made_from, log, parallel)
        run.train(progress)
        summary = {**run.summary(), "made_from": made_from}
        report = write_report(out_dir, summary) if lead else summary
        parallel.barrier()
        return report


# Settings that change how fast, not what, a student is trained: changing them reuses the output.
EXECUTION_ONLY = ("device", "tensorboard", "checkpoint_every_steps", "log_every_steps")


def trained_subclass_weight(settings: TrainSettings, n_subclasses: int) -> float:
    """The λ that trains: ``settings.subclass_weight``, None being the library's default; 1 at S = 1,
    where there is no subclass part to weight."""
    return resolve_subclass_weight(settings.subclass_weight, settings.divergence) if n_subclasses > 1 else 1.0


def _result_settings(settings: TrainSettings, num_classes: int, n_subclasses: int, compact) -> dict:
    train = {k: v for k, v in dataclasses.asdict(settings).items() if k not in EXECUTION_ONLY}
    train["subclass_weight"] = trained_subclass_weight(settings, n_subclasses)
    return {"train": train, "num_classes": num_classes, "n_subclasses": n_subclasses,
            "compact_temperatures": None if compact is None else list(compact)}


def data_digest(data) -> Optional[str]:
    """What a finished run's data are recognised by: every byte of a TensorDataset's tensors, or of
    a tensor (XXH3, ~0.04 s a GB), a Subset's indices and its dataset; any other dataset by its type
    and length, as its items are not read twice (another dataset of the same length needs a new
    out_dir)."""
    if data is None:
        return None
    if isinstance(data, Subset):  # random_split's: its rows are its indices into the whole
        rows = torch.as_tensor(list(data.indices), dtype=torch.int64)
        return f"subset {xxhash.xxh3_128(content_digest(rows)).hexdigest()} of {data_digest(data.dataset)}"
    tensors = data.tensors if isinstance(data, TensorDataset) else (data,) if torch.is_tensor(data) else None
    if tensors is None:
        return f"{type(data).__module__}.{type(data).__qualname__}:{len(data) if hasattr(data, '__len__') else '?'}"
    digest = xxhash.xxh3_128()
    for t in tensors:
        digest.update(f"{tuple(t.shape)}:{t.dtype}:".encode() + content_digest(t))
    return digest.hexdigest()


def _architecture(student: nn.Module) -> dict:
    """Parameter and buffer names, shapes and dtypes (not values: a fresh random init is the same student)."""
    return {k: [list(v.shape), str(v.dtype)] for k, v in student.state_dict().items()}


def _reuse_finished(student: nn.Module, out_dir: str, made_from: dict, log, remove: bool = True) -> Optional[dict]:
    """The report of a finished run made the same way, its weights loaded into ``student``; None
    (after removing the stale outputs, with ``remove``) when there is none or it was made otherwise."""
    report_path = os.path.join(out_dir, "report.json")
    if not os.path.exists(report_path):
        return None
    try:
        report = provenance.read_json(report_path)
    except ValueError:  # a damaged report: the run is made again
        report = {}
    if report.get("made_from") == made_from:
        try:
            load_student(student, out_dir)
            return report
        except (OSError, ValueError) as exc:  # missing or damaged weights: made again from the last checkpoint
            if remove:
                log(f"[train] {out_dir}'s student cannot be read ({str(exc).splitlines()[0]}): writing it again "
                    "from the last checkpoint (training again without one)")
                _remove(out_dir, ("report.json", "report.md", "curves.png", STUDENT))
            return None
    if not remove:
        return None
    why = provenance.changes(report.get("made_from") or {}, made_from) or ["made by an older version"]
    log(f"[train] {out_dir} was trained otherwise ({'; '.join(why)}): training again")
    _remove(out_dir, ("report.json", "report.md", "curves.png", STUDENT, CHECKPOINT, CHECKPOINT + ".sha256"))
    shutil.rmtree(os.path.join(out_dir, "tensorboard"), ignore_errors=True)
    return None


def _remove(out_dir: str, names) -> None:
    for name in names:
        if os.path.exists(os.path.join(out_dir, name)):
            os.unlink(os.path.join(out_dir, name))


def _training_data(train_data, targets, num_classes: int, n_subclasses: int, st: TrainSettings,
                   compact_temperatures=None, check_labels: bool = True):
    """(dataset of (item, target info), loss(out, target info, y) -> (loss, soft, hard), the targets' digest)."""
    if isinstance(targets, OnlineTargets):
        return _online_data(train_data, targets, num_classes, n_subclasses, st, check_labels)
    beta, tau = compact_temperatures or (None, None)
    data = TargetsDataset(targets, train_data, beta=beta, tau=tau, check_labels=check_labels)
    data.require_temperatures()
    _check_shape(f"the targets in {targets}", data.settings["num_classes"], data.settings["n_subclasses"],
                 num_classes, n_subclasses)
    data.read_into_memory()  # up to 1 GiB: a batch is then one index, as in a hand-written loop

    def offline(out, log_t, y):
        return distill_loss(out, log_t.to(out.device), y, num_classes=num_classes, n_subclasses=n_subclasses,
                            divergence=st.divergence, jsd_beta=st.jsd_beta, tau=st.tau, alpha=st.alpha,
                            return_components=True,
                            subclass_weight=st.subclass_weight)

    return data, offline, provenance.file_digest(os.path.join(data.directory, MANIFEST))


def _online_data(train_data, targets: "OnlineTargets", num_classes: int, n_subclasses: int, st: TrainSettings,
                 check_labels: bool = True):
    from ..capture import CaptureDataset
    from ..loss import LELPLoss

    projector = targets.projector
    _check_shape("the projector", projector.num_classes, projector.n_subclasses, num_classes, n_subclasses)
    loss = LELPLoss(projector, divergence=st.divergence, jsd_beta=st.jsd_beta, tau=st.tau, alpha=st.alpha,
                    subclass_weight=st.subclass_weight)

    def online(out, info, y):
        h, z = (t.to(out.device) for t in info)
        return loss(out, labels=y, embeddings=h, teacher_logits=z, return_components=True)

    data = CaptureDataset(targets.capture_dir, train_data, check_labels=check_labels)
    projector.require_same_teacher(data.source)
    digest = {"projector": projector_digest(projector), "capture": data.source.fingerprint()}
    return data, online, digest


def _check_shape(what: str, found_c: int, found_s: int, num_classes: int, n_subclasses: int) -> None:
    """K = C*S alone would let C = 3, S = 2 targets train a C = 2, S = 3 student: check both."""
    if (found_c, found_s) != (num_classes, n_subclasses):
        raise ValueError(f"{what} have C={found_c}, S={found_s} but the student is set up with "
                         f"num_classes={num_classes}, n_subclasses={n_subclasses}; pass the values they were made with")


class _Run:
    """One training run's state: model, optimiser, schedule, history, the position in the epoch;
    saved and restored as a checkpoint."""

    def __init__(self, student, data, loss_fn, out_dir, num_classes, n_subclasses, settings, val_data,
                 val_teacher_logits, made_from: dict, log, parallel: steps.DataParallel):
        st = settings
        self.device, self.parallel = steps.resolve_device(st.device), parallel
        self.student = student.to(self.device)
        self.model = parallel.wrap(self.student, self.device)  # DDP under torchrun
        self.data, self.loss_fn, self.out_dir, self.settings = data, loss_fn, out_dir, st
        self.c, self.s = num_classes, n_subclasses
        self.val_data, self.val_teacher_logits = val_data, val_teacher_logits
        self.made_from, self.log, self.lead = made_from, log, parallel.rank == 0
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=st.lr, weight_decay=st.weight_decay)
        batches = math.ceil(len(data) / st.batch_size)
        self.steps_per_epoch = math.ceil(batches / st.grad_accumulation)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.opt, steps.lr_factor(st.lr_schedule, st.warmup_steps, st.epochs * self.steps_per_epoch))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=st.mixed_precision == "fp16"
                                           and self.device.type == "cuda")
        self.epoch, self.batch, self.step, self.history = 0, 0, 0, []
        # The last batch's loss, soft and hard parts, and this epoch's sums so far (loss, soft, hard,
        # each x rows, then rows), kept on the device: reading them back would stall a GPU every
        # step, so they are read only where they are printed or logged.
        self.last = torch.full((4,), float("nan"), dtype=torch.float64, device=self.device)
        self.partial = torch.zeros(4, dtype=torch.float64, device=self.device)
        self._one = torch.ones((), device=self.device)  # counts the rows in the same add
        self.best, self.best_state = {"epoch": None, "accuracy": -1.0}, None
        self.writer = _tensorboard(out_dir) if st.tensorboard and self.lead else None
        self._restore()

    def train(self, progress: bool) -> None:
        if self.epoch == 0 and self.batch == 0:  # a resumed run continues the checkpointed random state
            torch.manual_seed(self.settings.seed)
        while self.epoch < self.settings.epochs and not self._stop_early():
            record = {"epoch": self.epoch + 1, **self._train_epoch(progress)}
            if self.val_data is not None:
                val = evaluate(self.student, self.val_data, self.c, self.s, teacher_logits=self.val_teacher_logits,
                               tau=self.settings.tau, device=self.device, name="val_data")
                record.update({f"val_{k}": v for k, v in val.items()})
                if val["accuracy"] > self.best["accuracy"]:
                    self.best = {"epoch": record["epoch"], "accuracy": val["accuracy"]}
                    self.best_state = {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()}
            self.history.append(record)
            self.epoch += 1
            self._log(record)
            self._save()
        if self._stop_early():
            self.log(f"[train] early stop after epoch {self.epoch}: no better validation accuracy for "
                     f"{self.settings.patience} epochs; keeping epoch {self.best['epoch']}")
        if self.best_state is not None:  # early stopping keeps the best epoch's weights
            self.student.load_state_dict(self.best_state)
        self._save_student()
        if self.writer is not None:
            self.writer.close()

    def _train_epoch(self, progress: bool) -> dict:
        st = self.settings
        self.model.train()
        order = torch.Generator().manual_seed(st.seed + self.epoch)
        # Gathered batches (slices of the mapped shards and of tensor inputs), in the order a
        # DataLoader(shuffle=True, generator=order) gives: resumed runs see the same batches.
        loader = GatheredBatches(self.data, st.batch_size, shuffle=True, generator=order)
        bar = _bar(progress and self.lead, len(loader), self.epoch + 1)
        for b, ((x, y), info) in enumerate(loader):
            if b >= self.batch:  # batches before it were trained before a mid-epoch checkpoint
                self._micro_step(x, torch.as_tensor(y), info)
                self.batch = b + 1
                if self.batch % st.grad_accumulation == 0 or self.batch == len(loader):
                    self._optimizer_step(mid_epoch=self.batch < len(loader))
            if bar is not None and bar.update(1):  # True when the bar redraws (at most ~10 times a second)
                bar.set_postfix_str(f"loss {float(self.last[0]):.4f}")
        if bar is not None:
            bar.close()
        loss, soft, hard, rows = self.parallel.sum(self.partial.clone()).tolist()
        self.batch, self.partial = 0, torch.zeros_like(self.partial)
        return {"train_loss": loss / max(rows, 1), "train_soft": soft / max(rows, 1), "train_hard": hard / max(rows, 1)}

    def _micro_step(self, x, y, info) -> None:
        """Forward and backward of this rank's share of one batch (gradients accumulate)."""
        st, rows = self.settings, y.shape[0]
        part = self.parallel.share(rows)
        x, y, info = steps.take(x, part, self.device), steps.take(y, part, self.device), steps.take(info, part)
        with steps.autocast(self.device, st.mixed_precision):
            out = self.model(x)
        loss, soft, hard = self.loss_fn(out, info, y)  # the fused loss computes in fp32 whatever out's dtype
        # This share's mean loss weighted by its part of the optimiser step's rows: the step's
        # gradient is the mean over all its rows, however they are split into batches and ranks.
        weight = self.parallel.loss_weight(y.shape[0], rows) * rows / self._step_rows(self.batch)
        self.scaler.scale(loss if weight == 1.0 else loss * weight).backward()  # one op less per step
        self.last = torch.stack((loss.detach(), soft, hard, self._one))  # soft τ²·D, hard α·CE; 1
        self.partial.add_(self.last, alpha=y.shape[0])  # two small ops a step: in a step they cost ~20 us each

    def _step_rows(self, b: int) -> int:
        """Rows of the optimiser step that batch ``b`` belongs to (its group of accumulated batches)."""
        n, size, acc = len(self.data), self.settings.batch_size, self.settings.grad_accumulation
        first = b - b % acc
        return min(n, (first + acc) * size) - first * size

    def _optimizer_step(self, mid_epoch: bool) -> None:
        st = self.settings
        if st.max_grad_norm is not None:
            self.scaler.unscale_(self.opt)
            nn.utils.clip_grad_norm_(self.student.parameters(), st.max_grad_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        lr = self.schedule.get_last_lr()[0]  # the rate this step used (the schedule's step sets the next)
        self.schedule.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        if st.log_every_steps and self.step % st.log_every_steps == 0 and self.writer is not None:
            for name, value in zip(("loss", "soft", "hard"), self.last.tolist()):
                self.writer.add_scalar(f"step/{name}", value, self.step)
            self.writer.add_scalar("step/lr", lr, self.step)
        if mid_epoch and st.checkpoint_every_steps and self.step % st.checkpoint_every_steps == 0:
            self._save()

    def _stop_early(self) -> bool:
        p = self.settings.patience
        return (p is not None and self.best["epoch"] is not None and self.epoch - self.best["epoch"] >= p)

    def _log(self, record: dict) -> None:
        line = f"[train] epoch {record['epoch']}/{self.settings.epochs}: loss {record['train_loss']:.4f}"
        if "val_accuracy" in record:
            best = " (best)" if self.best["epoch"] == record["epoch"] else ""
            line += f", val accuracy {record['val_accuracy']:.4f}{best}"
        self.log(line)
        if self.writer is not None:
            for key, value in record.items():
                if key != "epoch":
                    self.writer.add_scalar(key.replace("_", "/", 1), value, record["epoch"])
            self.writer.flush()

    # ------------------------------------------------------------------ checkpoint

    def _state(self, partial: torch.Tensor) -> dict:
        return {"student": self.student.state_dict(), "optimizer": self.opt.state_dict(),
                "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict(), "epoch": self.epoch,
                "batch": self.batch, "step": self.step, "partial": partial.cpu(), "history": self.history,
                "best": self.best, "best_state": self.best_state, "rng": torch.get_rng_state(),
                "made_from": self.made_from}

    def _save(self) -> None:
        # Every rank's sums of the epoch so far (a collective: every rank saves at the same step);
        # the restored run keeps them on its rank 0 alone, at any world size.
        partial = self.parallel.sum(self.partial.clone())
        if not self.lead:
            return
        buffer = io.BytesIO()
        torch.save(_canonical(self._state(partial)), buffer)
        # One file holds the checksum and the state: a kill cannot leave them out of step.
        shards.write_atomically(os.path.join(self.out_dir, CHECKPOINT), seal(buffer.getvalue()))

    def _restore(self) -> None:
        path = os.path.join(self.out_dir, CHECKPOINT)
        if not os.path.exists(path):
            return
        with open(path, "rb") as f:
            state = torch.load(io.BytesIO(unseal(f.read(), f"checkpoint {path}")), weights_only=False)
        if state.get("made_from") != self.made_from:
            why = provenance.changes(state.get("made_from") or {}, self.made_from)
            self.log(f"[train] checkpoint {path} was made otherwise ({'; '.join(why)}): training restarts")
            if self.lead:
                os.unlink(path)
            return
        self.student.load_state_dict(state["student"])
        self.opt.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        saved = state["partial"].to(self.device)  # the sums of all ranks: kept on rank 0 alone
        self.partial = saved if self.lead else torch.zeros_like(saved)
        self.history, self.best = state["history"], state["best"]
        self.best_state = state["best_state"]
        torch.set_rng_state(state["rng"])

    def _save_student(self) -> None:
        if not self.lead:
            return
        shards.write_atomically(os.path.join(self.out_dir, STUDENT), save_checked(self.student.state_dict()))

    def summary(self) -> dict:
        return {"settings": dataclasses.asdict(self.settings), "num_classes": self.c, "n_subclasses": self.s,
                "subclass_weight": trained_subclass_weight(self.settings, self.s),
                "epochs_run": self.epoch, "best": self.best, "history": self.history,
                "student_file": STUDENT}


def _canonical(state):
    """``state`` rebuilt with every string interned and fresh containers (tensors kept): pickle
    writes an object met twice as a reference to the first, so the same state gave other bytes in a
    resumed run, whose keys had come from the checkpoint, than in one not killed (a session-66 audit)."""
    if type(state) is str:
        return sys.intern(state)
    if type(state) is dict:  # not a module's state_dict (an OrderedDict whose _metadata load_state_dict reads)
        return {_canonical(k): _canonical(v) for k, v in state.items()}
    if type(state) in (list, tuple):
        return type(state)(_canonical(v) for v in state)
    return state


def _tensorboard(out_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: the report still has the curves
        return None
    return SummaryWriter(os.path.join(out_dir, "tensorboard"))


def _bar(enabled: bool, total: int, epoch: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}", unit="batch", leave=False)


def load_student(student: nn.Module, out_dir: str) -> nn.Module:
    """Loads the trained weights ``distill`` wrote into ``student`` (same architecture), after
    checking their sha256 (a flipped byte is an error naming the file, not a wrong student)."""
    path = os.path.join(os.fspath(out_dir), STUDENT)
    try:
        student.load_state_dict(load_checked(path))
    except RuntimeError as exc:  # torch's message lists every mismatched tensor, one a line
        first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise ValueError(f"{path} holds the weights of another student ({first}): the student given must be the "
                         "one trained (in a config, the same task and task.kwargs)") from None
    return student


__all__: Sequence[str] = ("OnlineTargets", "TrainSettings", "distill", "evaluate", "load_student")
