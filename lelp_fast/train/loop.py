"""Stage 4 of the user's path: a plain-PyTorch distillation loop over stored targets.

``distill`` trains a student on ``TargetsDataset(targets_dir, train_data)`` (the training inputs
joined to their stored LELP targets by row index) with the fused loss, evaluates it every epoch
(accuracy, and agreement / predictive KL against the teacher when its validation logits are
given), stops early when the validation accuracy has not improved for ``patience`` epochs, and
writes the best student, a checkpoint after every epoch, TensorBoard scalars and a final report
(``report.json``, ``report.md``, ``curves.png``) into ``out_dir``.

A run killed at any point and started again with the same arguments continues from its last
finished epoch and ends with the same student bytes: each epoch's shuffling is seeded by
``seed + epoch`` and the checkpoint holds the model, optimiser and history (sha256-checked).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, default_collate

from ..io.locks import ExclusiveLock
from ..metrics import agreement, predictive_kl
from ..offline import TargetsDataset, shards
from ..ops.loss import distill_loss
from ..reference import DIVERGENCES, class_logits
from .report import write_report

CHECKPOINT = "checkpoint.pt"
STUDENT = "student.safetensors"


@dataclasses.dataclass
class TrainSettings:
    """How the student is trained (every field is a key of the config's ``train`` section)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    divergence: str = "kl"
    jsd_beta: float = 0.5
    tau: float = 1.0
    alpha: float = 0.0
    patience: Optional[int] = None
    seed: int = 0
    device: str = "cpu"
    tensorboard: bool = True
    subclass_weight: float = 1.0  # λ on the subclass part of KL(t‖q): 1 is LELP, 0 class-level KD (issue 22)

    def check(self) -> None:
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("lr", "tau"):
            if not getattr(self, name) > 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)!r}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"train.divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"train.patience must be >= 1 or None, got {self.patience!r}")
        if not self.subclass_weight >= 0:
            raise ValueError(f"train.subclass_weight must be >= 0 (0: KD, 1: LELP), got {self.subclass_weight!r}")


def evaluate(student: nn.Module, data, num_classes: int, n_subclasses: int, *, teacher_logits=None,
             tau: float = 1.0, batch_size: int = 512, device="cpu") -> dict:
    """Accuracy of the class logits pooled at the loss's ``tau`` on ``data`` ((x, y) items); with the
    teacher's logits for the same rows, also top-1 agreement and predictive KL(teacher ‖ student)."""
    student.eval()
    outs, labels = [], []
    with torch.no_grad():
        for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
            outs.append(student(x.to(device)).float().cpu())
            labels.append(torch.as_tensor(y))
    s = torch.cat(outs)
    y = torch.cat(labels)
    pooled = class_logits(s, num_classes, n_subclasses, tau)
    result = {"accuracy": float((pooled.argmax(1) == y).double().mean())}
    if teacher_logits is not None:
        result["agreement"] = agreement(teacher_logits, s, tau)
        result["predictive_kl"] = predictive_kl(teacher_logits, s, tau)
    return result


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
    progress: bool = False,
) -> dict:
    """Trains ``student`` (inputs -> C*S logits); returns the report (dict).

    ``targets`` is a targets directory (``generate_targets``; rows in ``train_data``'s order), or
    :class:`OnlineTargets` to compute them in the fused loss from a capture's embeddings.
    ``compact_temperatures`` = (β, τ) turns compact targets (``u`` and teacher logits) into log-targets.
    """
    settings = settings or TrainSettings()
    settings.check()
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    with ExclusiveLock(os.path.join(out_dir, ".lock"), f"training directory {out_dir}"):
        report_path = os.path.join(out_dir, "report.json")
        if os.path.exists(report_path):  # finished: the stage is skipped
            with open(report_path) as f:
                return json.load(f)
        data, loss_fn = _training_data(train_data, targets, num_classes * n_subclasses, settings,
                                       compact_temperatures)
        run = _Run(student, data, loss_fn, out_dir, num_classes, n_subclasses, settings, val_data,
                   val_teacher_logits)
        run.train(progress)
        return write_report(out_dir, run.summary())


def _training_data(train_data, targets, k: int, st: TrainSettings, compact_temperatures=None):
    """(dataset of (item, target info), loss(out, target info, y) -> (loss, soft, hard))."""
    if isinstance(targets, OnlineTargets):
        from ..capture import CaptureDataset
        from ..loss import LELPLoss

        if targets.projector.n_outputs != k:
            raise ValueError(f"the projector has K={targets.projector.n_outputs} outputs, the student setup C*S = {k}")
        loss = LELPLoss(targets.projector, divergence=st.divergence, jsd_beta=st.jsd_beta, tau=st.tau,
                        alpha=st.alpha, subclass_weight=st.subclass_weight)

        def online(out, info, y):
            h, z = (t.to(out.device) for t in info)
            return loss(out, labels=y, embeddings=h, teacher_logits=z, return_components=True)

        return CaptureDataset(targets.capture_dir, train_data), online
    beta, tau = compact_temperatures or (None, None)
    data = TargetsDataset(targets, train_data, beta=beta, tau=tau)
    if data.settings["K"] != k:
        raise ValueError(f"the targets in {targets} have K={data.settings['K']} outputs, the student setup C*S = {k}")

    def offline(out, log_t, y):
        return distill_loss(out, log_t.to(out.device), y, num_classes=data.settings["num_classes"],
                            n_subclasses=data.settings["n_subclasses"], divergence=st.divergence,
                            jsd_beta=st.jsd_beta, tau=st.tau, alpha=st.alpha, return_components=True,
                            subclass_weight=st.subclass_weight)

    return data, offline


class _Run:
    """One training run's state: model, optimiser, history; saved and restored as a checkpoint."""

    def __init__(self, student, data, loss_fn, out_dir, num_classes, n_subclasses, settings, val_data,
                 val_teacher_logits):
        self.student = student.to(settings.device)
        self.data, self.loss_fn, self.out_dir, self.settings = data, loss_fn, out_dir, settings
        self.c, self.s = num_classes, n_subclasses
        self.val_data, self.val_teacher_logits = val_data, val_teacher_logits
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        self.epoch, self.history, self.best = 0, [], {"epoch": None, "accuracy": -1.0}
        self.best_state = None
        self.writer = _tensorboard(out_dir) if settings.tensorboard else None
        self._restore()

    def train(self, progress: bool) -> None:
        if self.epoch == 0:  # a resumed run continues the checkpointed random state instead
            torch.manual_seed(self.settings.seed)
        while self.epoch < self.settings.epochs and not self._stop_early():
            record = {"epoch": self.epoch + 1, **self._train_epoch(progress)}
            if self.val_data is not None:
                val = evaluate(self.student, self.val_data, self.c, self.s, teacher_logits=self.val_teacher_logits,
                               tau=self.settings.tau, device=self.settings.device)
                record.update({f"val_{k}": v for k, v in val.items()})
                if val["accuracy"] > self.best["accuracy"]:
                    self.best = {"epoch": record["epoch"], "accuracy": val["accuracy"]}
                    self.best_state = {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()}
            self.history.append(record)
            self.epoch += 1
            self._log(record)
            self._save()
        if self.best_state is not None:  # early stopping keeps the best epoch's weights
            self.student.load_state_dict(self.best_state)
        self._save_student()
        if self.writer is not None:
            self.writer.close()

    def _train_epoch(self, progress: bool) -> dict:
        st = self.settings
        self.student.train()
        order = torch.Generator().manual_seed(st.seed + self.epoch)
        loader = DataLoader(self.data, batch_size=st.batch_size, shuffle=True, generator=order,
                            collate_fn=default_collate)
        total = {"loss": 0.0, "soft": 0.0, "hard": 0.0}
        rows = 0
        bar = _bar(progress, len(loader), self.epoch + 1)
        for (x, y), info in loader:
            x, y = x.to(st.device), torch.as_tensor(y).to(st.device)
            out = self.student(x)
            loss, soft, hard = self.loss_fn(out, info, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            n, value = y.shape[0], float(loss.detach())
            total["loss"] += value * n
            total["soft"] += float(soft) * n  # τ²·D and α·CE, from the kernel's pass
            total["hard"] += float(hard) * n
            rows += n
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"loss {value:.4f}")
        if bar is not None:
            bar.close()
        return {f"train_{k}": v / max(rows, 1) for k, v in total.items()}

    def _stop_early(self) -> bool:
        p = self.settings.patience
        return (p is not None and self.best["epoch"] is not None and self.epoch - self.best["epoch"] >= p)

    def _log(self, record: dict) -> None:
        if self.writer is not None:
            for key, value in record.items():
                if key != "epoch":
                    self.writer.add_scalar(key.replace("_", "/", 1), value, record["epoch"])
            self.writer.flush()

    # ------------------------------------------------------------------ checkpoint

    def _state(self) -> dict:
        return {"student": self.student.state_dict(), "optimizer": self.opt.state_dict(), "epoch": self.epoch,
                "history": self.history, "best": self.best, "best_state": self.best_state,
                "rng": torch.get_rng_state()}

    def _save(self) -> None:
        buffer = io.BytesIO()
        torch.save(self._state(), buffer)
        blob = buffer.getvalue()
        path = os.path.join(self.out_dir, CHECKPOINT)
        shards.write_atomically(path + ".sha256", shards.sha256(blob).encode())
        shards.write_atomically(path, blob)

    def _restore(self) -> None:
        path = os.path.join(self.out_dir, CHECKPOINT)
        if not os.path.exists(path):
            return
        blob = open(path, "rb").read()
        digest = open(path + ".sha256").read().strip() if os.path.exists(path + ".sha256") else None
        if digest != shards.sha256(blob):
            raise ValueError(f"checkpoint {path} fails its sha256 checksum (corrupt); delete it to restart training")
        state = torch.load(io.BytesIO(blob), weights_only=False)
        self.student.load_state_dict(state["student"])
        self.opt.load_state_dict(state["optimizer"])
        self.epoch, self.history, self.best = state["epoch"], state["history"], state["best"]
        self.best_state = state["best_state"]
        torch.set_rng_state(state["rng"])

    def _save_student(self) -> None:
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.student.state_dict().items()}
        shards.write_atomically(os.path.join(self.out_dir, STUDENT), save(tensors))

    def summary(self) -> dict:
        return {"settings": dataclasses.asdict(self.settings), "num_classes": self.c, "n_subclasses": self.s,
                "epochs_run": self.epoch, "best": self.best, "history": self.history,
                "student_file": STUDENT}


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
    """Loads the trained weights ``distill`` wrote into ``student`` (same architecture)."""
    from safetensors.torch import load_file

    student.load_state_dict(load_file(os.path.join(os.fspath(out_dir), STUDENT)))
    return student


__all__: Sequence[str] = ("OnlineTargets", "TrainSettings", "distill", "evaluate", "load_student")
