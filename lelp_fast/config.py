"""The typed schema of one run: capture -> fit -> targets -> train, in one YAML file.

Every section mirrors a stage's Python function and CLI command; unknown keys and keys given
twice are errors, and a bad value is reported on one line naming its key (``train.epochs: value
must be an integer >= 1, got 0``), checked by the same functions as the Python API's and the
CLI's arguments. Example files are in ``examples/configs/``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Dict, Literal, Optional, Sequence

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from ._checks import check_count, check_nonnegative, check_positive

from .offline.shards import DEFAULT_DTYPE as DEFAULT_TARGETS_DTYPE
from .projector import DEFAULT_BETA
from .reference import require_kl_for_subclass_weight


def _shared(check):
    """A field type validated by the Python API's own check (``lelp_fast._checks``), so a config,
    the CLI and the API accept and refuse the same values (``True`` is not a count of 1)."""
    def validate(value):
        check("value", value)
        return value

    return BeforeValidator(validate)


def _check_device(name, value):
    """A device string torch reads ("cpu", "cuda", "cuda:1"): refused when the config is read, not after
    the stages before the one that uses it have run."""
    try:
        torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {value!r}") from None


Device = Annotated[str, _shared(_check_device)]
AutoDevice = Annotated[str, _shared(lambda name, value: value == "auto" or _check_device(name, value))]
Count = Annotated[int, _shared(check_count)]
NonNegativeCount = Annotated[int, _shared(lambda name, v: check_count(name, v, minimum=0))]
Positive = Annotated[float, _shared(check_positive)]
NonNegative = Annotated[float, _shared(check_nonnegative)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskConfig(_Section):
    """Where the teacher, the data splits and the student come from: ``module:function`` (the
    module importable where lelp-fast runs: installed or on ``PYTHONPATH``) called with ``work_dir`` and ``kwargs``, returning an object with ``teacher``, ``train``, ``val``,
    ``test``, ``num_classes`` and ``make_student(K)`` (see ``lelp_fast.examples.fashion_mnist``)."""

    factory: str = Field(pattern=r"^[\w.]+:\w+$")
    kwargs: Dict[str, Any] = {}


class CaptureConfig(_Section):
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    batch_size: Count = 256
    batches_per_shard: Count = 16
    layer: Optional[str] = None
    head: Optional[str] = "auto"
    device: Device = "cpu"
    autocast: Optional[Literal["float16", "bfloat16"]] = None


class FitConfig(_Section):
    subclasses: Count = 4
    beta: Positive = DEFAULT_BETA
    tau: Positive = 1.0
    method: Literal["auto", "exact", "nystrom"] = "auto"
    null_space: Optional[bool] = None
    rotate: bool = True
    standardize: bool = True
    seed: int = 0
    assign: Literal["label", "teacher"] = "label"
    oversampling: NonNegativeCount = 10
    passes: Count = 3
    iteration_sample: float = Field(0.125, gt=0, le=1)
    nan_policy: Literal["raise", "skip"] = "raise"
    chunk_mb: float = Field(64.0, ge=1 / 1024)
    checkpoint_every: Count = 16
    device: Device = "cpu"


class TargetsConfig(_Section):
    format: Literal["npy", "safetensors", "parquet"] = "npy"
    dtype: Literal["float32", "float16", "bfloat16"] = DEFAULT_TARGETS_DTYPE
    backend: Literal["auto", "torch", "cpu", "cuda", "triton"] = "auto"
    beta: Optional[Positive] = None  # default: the projector's
    tau: Optional[Positive] = None
    compact: bool = False  # store u and the teacher logits; beta/tau applied when training
    chunk_mb: float = Field(64.0, ge=1 / 1024)
    device: Optional[Device] = None

    @model_validator(mode="after")
    def _parquet_has_no_bfloat16(self):
        # refused here, not by the targets stage after it removed the stored targets
        if self.format == "parquet" and self.dtype == "bfloat16":
            raise ValueError("targets.format parquet stores float32 or float16, not targets.dtype bfloat16 "
                             "(Parquet has no bfloat16): take float16, or format npy or safetensors")
        return self


class TrainConfig(_Section):
    epochs: Count = 10
    batch_size: Count = 128
    lr: Positive = 1e-3
    weight_decay: NonNegative = 0.0
    divergence: Literal["kl", "reverse_kl", "js", "jsd", "tvd", "mse"] = "kl"  # "jsd": TRL's and Liger's "js"
    jsd_beta: float = Field(0.5, ge=0, le=1)
    tau: Positive = 1.0
    alpha: NonNegative = 0.0
    patience: Optional[Count] = None
    seed: int = 0
    device: AutoDevice = "auto"  # this rank's GPU when there is one, else the CPU
    tensorboard: bool = True
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    grad_accumulation: Count = 1
    max_grad_norm: Optional[Positive] = None
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: NonNegativeCount = 0
    checkpoint_every_steps: Optional[Count] = None
    log_every_steps: Optional[Count] = None
    # λ on the subclass part of the KL: 1 is the paper's LELP, 0 class-level KD on the pooled student;
    # null: the library's default, 0.1 with KL (reference.DEFAULT_SUBCLASS_WEIGHT), 1 with another divergence
    subclass_weight: Optional[NonNegative] = None

    @model_validator(mode="after")
    def _subclass_weight_needs_kl(self):
        require_kl_for_subclass_weight(self.subclass_weight, self.divergence, "train.subclass_weight")
        return self


class ReportConfig(_Section):
    kd_baseline: bool = True  # train vanilla KD (S = 1) on the same rows, settings and seed, and compare


class RunConfig(_Section):
    """One distillation run; ``work_dir`` holds every stage's output (a relative path is taken
    from the directory lelp-fast runs in, not from the config file's)."""

    work_dir: str
    task: TaskConfig
    capture: CaptureConfig = CaptureConfig()
    fit: FitConfig = FitConfig()
    targets: TargetsConfig = TargetsConfig()
    train: TrainConfig = TrainConfig()
    report: ReportConfig = ReportConfig()


class ConfigError(ValueError):
    """A config file that does not parse or validate; the message names the file and the key."""


def load_config(path: str, overrides: Sequence[str] = ()) -> RunConfig:
    """Reads and validates a YAML run config, raising :class:`ConfigError` with one line per problem.
    ``overrides`` are ``key=value`` strings (``train.epochs=3``; the value is read as YAML) applied
    before validation, as ``lelp-fast run CONFIG --set train.epochs=3`` does."""
    import yaml

    try:
        with open(path) as f:
            raw = yaml.load(f, Loader=_unique_keys_loader())
    except FileNotFoundError:
        raise ConfigError(f"config {path}: no such file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: expected a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        _override(raw, item)
    set_keys = [item.partition("=")[0].strip() for item in overrides]
    return parse_config(raw, f"config {path}", set_keys)


def _override(raw: dict, item: str) -> None:
    """Sets ``a.b=value`` in the nested mapping ``raw``."""
    import yaml

    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.epochs=3")
    *sections, name = key.strip().split(".")
    node = raw
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {section} is not a section")
    try:
        node[name] = yaml.load(text, Loader=_unique_keys_loader())
    except yaml.YAMLError:
        node[name] = text


# YAML 1.2's floats with an exponent (PyYAML reads YAML 1.1, where 1e-3, without a dot, is a string)
YAML12_FLOAT = re.compile(r"""^(?:[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+
    |[-+]?\.[0-9][0-9_]*[eE][-+]?[0-9]+)$""", re.X)


def _unique_keys_loader():
    """yaml's SafeLoader, except that a key given twice in one mapping (a second ``train:``
    section, say) is an error instead of the last one silently winning."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key!r} is given twice (line {key_node.start_mark.line + 1})", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    # `lr: 1e-3` was refused as "got '1e-3'" where `lr: 1.0e-3` was taken
    UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float", YAML12_FLOAT, list("-+0123456789."))
    return UniqueKeyLoader



def parse_config(raw: dict, where: str = "config", set_keys: Sequence[str] = ()) -> RunConfig:
    """``raw`` validated; ``set_keys``: those given by ``--set``, which an error names as such."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_problem(e, set_keys) for e in exc.errors())
        raise ConfigError(f"{where}: {problems}") from None


def _problem(error: dict, set_keys: Sequence[str]) -> str:
    key = ".".join(str(p) for p in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    # the key set, a key inside it, or (an unknown section: not a section's own check) the section it is in
    from_set = any(key == k or key.startswith(k + ".")
                   or (error["type"] == "extra_forbidden" and k.startswith(key + ".")) for k in set_keys)
    return f"{key}{' (--set)' if from_set else ''}: {message}"
