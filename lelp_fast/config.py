"""The typed schema of one run: capture -> fit -> targets -> train, in one YAML file.

Every section mirrors a stage's Python function and CLI command; unknown keys are errors, and a
bad value is reported on one line naming its key (``train.epochs: Input should be greater than
0``). Example files are in ``examples/configs/``.
"""

from __future__ import annotations

from typing import Any, Dict, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .projector import DEFAULT_BETA


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskConfig(_Section):
    """Where the teacher, the data splits and the student come from: ``module:function`` called
    with ``work_dir`` and ``kwargs``, returning an object with ``teacher``, ``train``, ``val``,
    ``test``, ``num_classes`` and ``make_student(K)`` (see ``lelp_fast.examples.fashion_mnist``)."""

    factory: str = Field(pattern=r"^[\w.]+:\w+$")
    kwargs: Dict[str, Any] = {}


class CaptureConfig(_Section):
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    batch_size: int = Field(256, gt=0)
    batches_per_shard: int = Field(16, gt=0)
    layer: Optional[str] = None
    head: Optional[str] = "auto"
    device: str = "cpu"
    autocast: Optional[Literal["float16", "bfloat16"]] = None


class FitConfig(_Section):
    subclasses: int = Field(4, gt=0)
    beta: float = Field(DEFAULT_BETA, gt=0)
    tau: float = Field(1.0, gt=0)
    method: Literal["auto", "exact", "nystrom"] = "auto"
    null_space: Optional[bool] = None
    rotate: bool = True
    standardize: bool = True
    seed: int = 0
    assign: Literal["label", "teacher"] = "label"
    oversampling: int = Field(10, ge=0)
    passes: int = Field(3, gt=0)
    iteration_sample: float = Field(0.125, gt=0, le=1)
    nan_policy: Literal["raise", "skip"] = "raise"
    chunk_mb: float = Field(64.0, ge=1 / 1024)
    checkpoint_every: int = Field(16, gt=0)
    device: str = "cpu"


class TargetsConfig(_Section):
    format: Literal["npy", "safetensors", "parquet"] = "npy"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    backend: Literal["auto", "torch", "cpu", "cuda", "triton"] = "auto"
    beta: Optional[float] = Field(None, gt=0)  # default: the projector's
    tau: Optional[float] = Field(None, gt=0)
    compact: bool = False  # store u and the teacher logits; beta/tau applied when training
    chunk_mb: float = Field(64.0, ge=1 / 1024)
    device: Optional[str] = None


class TrainConfig(_Section):
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    divergence: Literal["kl", "reverse_kl", "js", "jsd", "tvd", "mse"] = "kl"  # "jsd": TRL's and Liger's "js"
    jsd_beta: float = Field(0.5, ge=0, le=1)
    tau: float = Field(1.0, gt=0)
    alpha: float = Field(0.0, ge=0)
    patience: Optional[int] = Field(None, gt=0)
    seed: int = 0
    device: str = "cpu"
    tensorboard: bool = True


class RunConfig(_Section):
    """One distillation run; ``work_dir`` holds every stage's output."""

    work_dir: str
    task: TaskConfig
    capture: CaptureConfig = CaptureConfig()
    fit: FitConfig = FitConfig()
    targets: TargetsConfig = TargetsConfig()
    train: TrainConfig = TrainConfig()


class ConfigError(ValueError):
    """A config file that does not parse or validate; the message names the file and the key."""


def load_config(path: str) -> RunConfig:
    """Reads and validates a YAML run config, raising :class:`ConfigError` with one line per problem."""
    import yaml

    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config {path}: no such file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: expected a mapping of sections, got {type(raw).__name__}")
    return parse_config(raw, path)


def parse_config(raw: dict, where: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{where}: {problems}") from None
