"""A transformers sequence classifier with C labels around an LELP student with C·S labels.

The class logits ``τ·logsumexp(s_c/τ)`` are not a linear map of the student's features, so no
rewrite of its ``nn.Linear`` head gives them; the pooling stays a layer after the student.
``LELPPooledForSequenceClassification`` holds the student (its config kept whole in
``student_config``) and answers with C class logits; its config carries the C labels, so
``pipeline("text-classification")`` answers with them.

This file imports only torch and transformers: it is copied next to an exported model (and named
in ``auto_map``), so ``from_pretrained(dir, trust_remote_code=True)`` loads it where lelp_fast is
not installed. Where it is, ``import lelp_fast.export`` registers the classes and no remote code
is needed.
"""

from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

MODEL_TYPE = "lelp_pooled"


class LELPPooledConfig(PretrainedConfig):
    """``num_labels`` = C (with ``id2label``); the student's own config in ``student_config``."""

    model_type = MODEL_TYPE

    def __init__(self, student_config=None, n_subclasses: int = 1, tau: float = 1.0, **kwargs):
        if hasattr(student_config, "to_dict"):
            student_config = student_config.to_dict()
        self.student_config = dict(student_config or {})
        self.n_subclasses = int(n_subclasses)
        self.tau = float(tau)
        super().__init__(**kwargs)


class LELPPooledForSequenceClassification(PreTrainedModel):
    """The student's forward, then the class pooling in fp32; ``labels`` give the pooled CE loss."""

    config_class = LELPPooledConfig
    base_model_prefix = "student"

    def __init__(self, config: LELPPooledConfig):
        super().__init__(config)
        inner = dict(config.student_config)
        student_config = AutoConfig.for_model(inner.pop("model_type"), **inner)
        self.student = AutoModelForSequenceClassification.from_config(student_config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, labels: Optional[torch.Tensor] = None, **kwargs):
        kwargs.pop("return_dict", None)
        out = self.student(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        c, s, tau = self.config.num_labels, self.config.n_subclasses, self.config.tau
        grouped = out.logits.float().unflatten(-1, (c, s))
        logits = torch.logsumexp(grouped, -1) if tau == 1.0 else _pool(grouped, tau)
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        attentions=out.attentions)


def _pool(grouped: torch.Tensor, tau: float) -> torch.Tensor:
    """``τ·logsumexp(s/τ)``, shifted at τ < 1 by each class's largest logit, where s/τ overflows fp32
    (lelp_fast.export.module.pool; this file is copied beside models loaded without lelp_fast)."""
    if tau >= 1.0:
        return tau * torch.logsumexp(grouped / tau, -1)
    shift = grouped.amax(-1, keepdim=True)
    shift = shift.masked_fill(shift == float("-inf"), 0.0)
    return (shift + tau * torch.logsumexp((grouped - shift) / tau, -1, keepdim=True)).squeeze(-1)


def register() -> None:
    """Makes ``AutoConfig`` / ``AutoModelForSequenceClassification`` (and so ``pipeline``) know the type."""
    try:
        AutoConfig.register(MODEL_TYPE, LELPPooledConfig)
        AutoModelForSequenceClassification.register(LELPPooledConfig, LELPPooledForSequenceClassification)
    except ValueError:  # already registered (this file imported twice: package and remote-code copy)
        pass
