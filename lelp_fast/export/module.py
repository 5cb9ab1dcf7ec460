"""Stage 6 of the user's path for plain modules: fold the S-way pooling into the student and save it.

The student was trained on ``softmax(s/τ)`` over its ``K = C·S`` outputs; the class distribution it
learned is ``softmax(τ·logsumexp(s_c/τ))`` (``reference.class_logits``). :class:`PooledClassifier`
puts that pooling after the student, so what is saved answers with C class logits and nothing
downstream needs to know about subclasses. Saved as a ``torch.export`` program (``.pt2``), ONNX, or
TorchScript (deprecated by PyTorch, kept for runtimes that still load it).
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
import zipfile
from typing import Any, Optional, Tuple

import torch
from torch import nn

from .._checks import check_positive
from ..io.integrity import write_through_temp

FORMATS = ("torch-export", "onnx", "torchscript")
FORMAT_SUFFIX = {"torch-export": ".pt2", "onnx": ".onnx", "torchscript": ".ts"}  # in messages


class PooledClassifier(nn.Module):
    """``student`` (inputs -> (…, C·S) logits, or an output with ``.logits``) followed by the class
    pooling ``τ·logsumexp(s_c/τ)``: inputs -> (…, C) class logits, computed in fp32 (DESIGN §1)."""

    def __init__(self, student: nn.Module, num_classes: int, n_subclasses: int, tau: float = 1.0):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("n_subclasses", n_subclasses)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        check_positive("tau", tau)
        self.student = student
        self.num_classes, self.n_subclasses, self.tau = num_classes, n_subclasses, float(tau)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.student(*args, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out
        grouped = logits.float().unflatten(-1, (self.num_classes, self.n_subclasses))
        if self.tau == 1.0:  # the same expression as reference.class_logits at τ = 1
            return torch.logsumexp(grouped, dim=-1)
        return pool(grouped, self.tau)

    def check_outputs(self, example: Tuple[torch.Tensor, ...]) -> None:
        """Refuses a student whose output width is not C·S (checked once on the example input)."""
        with torch.no_grad():
            out = self.student(*example)
        k = (out.logits if hasattr(out, "logits") else out).shape[-1]
        if k != self.num_classes * self.n_subclasses:
            raise ValueError(f"the student has {k} outputs, but num_classes * n_subclasses = "
                             f"{self.num_classes} * {self.n_subclasses} = {self.num_classes * self.n_subclasses}")


def pool(grouped: torch.Tensor, tau: float) -> torch.Tensor:
    """``τ·logsumexp(s/τ)`` over the last axis; at τ < 1 shifted by each class's largest logit first,
    as reference.class_logits, since s/τ overflows fp32 where s does not (3e38 at τ = 0.5 gave inf)."""
    if tau >= 1.0:
        return tau * torch.logsumexp(grouped / tau, dim=-1)
    shift = grouped.amax(dim=-1, keepdim=True)
    shift = shift.masked_fill(shift == float("-inf"), 0.0)  # a class of -inf logits stays -inf
    return (shift + tau * torch.logsumexp((grouped - shift) / tau, dim=-1, keepdim=True)).squeeze(-1)


def export_module(student: nn.Module, path: str, example, *, num_classes: int, n_subclasses: int,
                  tau: float = 1.0, format: str = "torch-export") -> PooledClassifier:
    """Saves ``student`` with the pooling folded in, so the file maps inputs to C class logits.

    ``example`` is one input batch (a tensor or a tuple of tensors); its first dimension is saved
    as dynamic (any batch size). A student wrapped in DistributedDataParallel or ``torch.compile``
    is saved unwrapped. The export runs in eval mode, after which ``student`` keeps the train/eval
    mode it had. Returns the wrapper around it (call ``.eval()`` on it for inference)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if not isinstance(example, (torch.Tensor, tuple, list)):
        raise ValueError(f"example must be a tensor or a tuple of tensors (the student's positional inputs), "
                         f"got {type(example).__name__}")
    example = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    # torch.export specialises a dimension of size 1 (no dynamic batch): show it two rows.
    example = tuple(torch.cat([t, t]) if t.shape[0] == 1 else t for t in example)
    student = unwrap(student)
    modes = [(m, m.training) for m in student.modules()]
    model = PooledClassifier(student, num_classes, n_subclasses, tau).eval()
    try:
        _check_and_save(model, path, example, format)
    finally:  # the caller's student (and so the wrapper) back in the modes it had
        for m, training in modes:
            m.training = training
        model.training = student.training
    return model


def unwrap(student: nn.Module) -> nn.Module:
    """The student inside DistributedDataParallel / DataParallel (``.module``) or ``torch.compile``
    (``._orig_mod``): what a training script holds is saved as the plain module."""
    while True:
        if isinstance(student, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            student = student.module
        elif isinstance(getattr(student, "_orig_mod", None), nn.Module):
            student = student._orig_mod
        else:
            return student


def _check_and_save(model: PooledClassifier, path: str, example: tuple, format: str) -> None:
    model.check_outputs(example)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path}: directory {directory} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path}: it is a directory; name the file to write in it "
                                f"(e.g. {os.path.join(path, 'student' + FORMAT_SUFFIX[format])})")
    save = {"torch-export": _save_program, "onnx": _save_onnx, "torchscript": _save_torchscript}[format]
    if format == "onnx" and _one_file(model).get("external_data"):
        save(model, path, example)  # its weights' file is named after the model's: written in place
    else:
        # a killed export leaves the old file or none; the file is written under its own name, which
        # torch's archives record
        write_through_temp(lambda tmp: save(model, tmp, example), path)


def _dynamic_batch(example: Tuple[torch.Tensor, ...]) -> tuple:
    batch = torch.export.Dim("batch")
    return (tuple({0: batch} for _ in example),)  # one entry: forward's *args, a tuple of inputs


def _save_program(model: nn.Module, path: str, example) -> None:
    program = torch.export.export(model, example, dynamic_shapes=_dynamic_batch(example))
    torch.export.save(program, path)


def _save_onnx(model: nn.Module, path: str, example) -> None:
    try:
        import onnxscript  # noqa: F401  (the exporter torch uses since 2.5 needs it)
    except ImportError:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install 'lelp_fast[export]'") from None
    names = [f"input_{i}" for i in range(len(example))] if len(example) > 1 else ["input"]
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation, not the user's
            torch.onnx.export(model, example, path, dynamo=True, input_names=names, output_names=["class_logits"],
                              dynamic_shapes=_dynamic_batch(example), verbose=False, **_one_file(model))
    finally:
        quiet.setLevel(level)


def _one_file(model: nn.Module) -> dict:
    """The exporter's keyword for weights inside the .onnx file, not beside it in a .onnx.data file a
    user copying the model would leave behind: where this torch takes it, and the weights fit
    protobuf's 2 GB."""
    if "external_data" not in inspect.signature(torch.onnx.export).parameters:
        return {}
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return {"external_data": weights >= ONNX_INLINE_LIMIT}


ONNX_INLINE_LIMIT = 1 << 30  # bytes of weights kept inside the .onnx file (protobuf caps it at 2 GB)


def _save_torchscript(model: nn.Module, path: str, example) -> None:
    with warnings.catch_warnings():  # PyTorch deprecates TorchScript; the user asked for it by name
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        torch.jit.trace(model, example).save(path)


def load_exported(path: str, format: Optional[str] = None):
    """A callable that maps inputs to class logits, from a file :func:`export_module` wrote (not ONNX:
    use onnxruntime there). ``format``: "torch-export" or "torchscript"; by default, the file's own."""
    if format is None:
        format = exported_format(path)
    if format == "torch-export":
        return torch.export.load(path).module()
    if format == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
            return torch.jit.load(path)
    if format == "onnx":
        raise ValueError(f"{path} is not a zip archive (an ONNX model?): load ONNX with onnxruntime "
                         "(pip install 'lelp_fast[export]')")
    raise ValueError(f"load_exported reads 'torch-export' or 'torchscript' files, got {format!r}")


def exported_format(path: str) -> str:
    """Which of :data:`FORMATS` wrote ``path``: a TorchScript archive holds its code (``code/``), a
    torch.export one (of any torch version) does not; ONNX is a protobuf, not a zip archive."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"exported model {path} does not exist")
    if not zipfile.is_zipfile(path):
        return "onnx"
    with zipfile.ZipFile(path) as archive:
        return "torchscript" if any("/code/" in name for name in archive.namelist()) else "torch-export"
