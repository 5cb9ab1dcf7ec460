"""Training with ``transformers.Trainer``: the LELP loss in ``compute_loss``, the targets kept.

``LELPTrainer`` is a ``Trainer`` whose loss is :class:`~lelp_fast.LELPLoss` on the model's logits
(``num_labels = C*S``) against a targets column of each batch (default ``"lelp_targets"``), with
the labels for the optional hard term and ``ignore_index``. Its collator keeps that column (stored
targets are otherwise dropped before the collator, as DistillKit's PR #1 found) next to any data
collator you pass (``DataCollatorWithPadding`` too), it logs the soft and hard parts next to the
loss, and falls back to the cross-entropy of the pooled class logits for batches without targets
(a plain evaluation set).
:class:`WithTargets` joins a dataset of dict items to stored targets by row index.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from transformers import Trainer

from ..loss import LELPLoss
from ..offline import TargetsDataset
from ..reference import class_logits

TARGETS_KEY = "lelp_targets"


class WithTargets(torch.utils.data.Dataset):
    """``dataset[i]`` (a dict) plus ``{key: log-targets of row i}`` from a targets directory;
    ``beta``/``tau`` and ``check_labels`` as :class:`~lelp_fast.TargetsDataset`'s (the temperatures
    compact targets and a KD logits store are read at; a row's "labels" against the stored)."""

    def __init__(self, dataset, targets_dir: str, key: str = TARGETS_KEY, *, beta: Optional[float] = None,
                 tau: Optional[float] = None, check_labels: bool = True):
        self.joined = TargetsDataset(targets_dir, dataset, beta=beta, tau=tau, check_labels=check_labels)
        self.joined.require_temperatures()  # named here, not at the first row the Trainer asks for
        self.key = key

    def __len__(self) -> int:
        return len(self.joined)

    def __getitem__(self, i: int) -> dict:
        item, targets = self.joined[i]
        if not isinstance(item, dict):
            raise TypeError(f"WithTargets needs dict items (a tokenised dataset), got {type(item).__name__}")
        return {**item, self.key: targets}


class TargetsCollator:
    """Collates a batch of dict rows with stored targets: the targets column is stacked apart and
    the rest goes to the wrapped collator (``DataCollatorWithPadding`` would try to pad it), after
    dropping the columns the model's ``forward`` does not take (text, ids: what Trainer's
    ``remove_unused_columns`` would drop)."""

    def __init__(self, collator, targets_key: str, keep: Optional[set] = None):
        from transformers import default_data_collator

        self.collator = collator or default_data_collator
        self.targets_key, self.keep = targets_key, keep

    def __call__(self, features):
        targets = [f[self.targets_key] for f in features if self.targets_key in f]
        if targets and len(targets) != len(features):
            raise ValueError(f"some rows of the batch have a {self.targets_key!r} column and some do not")
        rows = [{k: v for k, v in f.items() if k != self.targets_key and (self.keep is None or k in self.keep)}
                for f in features]
        batch = self.collator(rows)
        if targets:
            batch[self.targets_key] = torch.stack([torch.as_tensor(t) for t in targets])
        return batch


class LELPTrainer(Trainer):
    """``Trainer(model, args, train_dataset=WithTargets(...), ...)`` with ``lelp_loss=LELPLoss(...)``.

    Trainer's own column removal would drop the targets column before the collator; instead the
    data collator (yours, e.g. ``DataCollatorWithPadding``, or the default) is wrapped in a
    :class:`TargetsCollator` that keeps the targets apart and drops what ``forward`` does not take,
    so ``args.remove_unused_columns`` is turned off (as TRL's trainers do).

    ``compute_loss`` returns the batch's mean, so Trainer must divide it by the gradient accumulation
    steps: a model whose ``forward`` takes ``**kwargs`` (BERT's does) made it take the loss as
    scaled already, and the update was G times too large."""

    loss_is_scaled_for_ga = False  # transformers >= 5: the loss is a per-batch mean

    def __init__(self, *args, lelp_loss: LELPLoss, targets_key: str = TARGETS_KEY, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # transformers 4.46-4.x: not scaled by num_items_in_batch
        self.lelp_loss, self.targets_key = lelp_loss, targets_key
        self._parts = {"loss_soft": [], "loss_hard": []}
        keep = None
        if self.args.remove_unused_columns:
            forward = inspect.signature(self.model.forward).parameters
            keep = set(forward) | {"labels", "label", "label_ids", *(self.args.label_names or [])}
            self.args.remove_unused_columns = False
        self.data_collator = TargetsCollator(self.data_collator, targets_key, keep)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch: Optional[int] = None):
        targets = inputs.pop(self.targets_key, None)
        labels = inputs.pop("labels", None)
        outputs = model(**inputs)
        logits = outputs.logits
        if targets is None:  # no stored targets (an evaluation set): CE of the pooled class logits
            pooled = class_logits(logits.float(), self.lelp_loss.num_classes, self.lelp_loss.n_subclasses,
                                  self.lelp_loss.tau)
            loss = torch.nn.functional.cross_entropy(pooled, labels, ignore_index=self.lelp_loss.ignore_index)
        else:
            loss, soft, hard = self.lelp_loss(logits, targets, labels, return_components=True)
            if model.training:
                self._parts["loss_soft"].append(float(soft))
                self._parts["loss_hard"].append(float(hard))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        for key, values in self._parts.items():
            if values and "loss" in logs:
                logs[key] = sum(values) / len(values)
                values.clear()
        super().log(logs, *args, **kwargs)
