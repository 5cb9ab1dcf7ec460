"""Stage 6 of the user's path: a C-class model with the S-way pooling folded in.

Plain modules: :func:`export_module` (``torch.export``, ONNX, TorchScript). transformers students:
:func:`export_hf` (a ``save_pretrained`` directory whose config has the C labels); importing
``lelp_fast.export.hf`` registers its model type, so ``AutoModelForSequenceClassification.from_pretrained`` and
``pipeline`` load it without ``trust_remote_code``. The HF half is imported lazily (transformers is
an optional dependency).
"""

from .module import FORMATS, PooledClassifier, export_module, load_exported

__all__ = ["FORMATS", "PooledClassifier", "export_hf", "export_module", "load_exported"]


def __getattr__(name):
    if name == "export_hf":
        from .hf import export_hf

        return export_hf
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
