"""The built-in trainer: FT, LoRA and DoRA runs with intermediate checkpoints.

The checkpoints are in the formats the analyzer reads (a full ``model.safetensors`` under the
base's tensor names, or a PEFT adapter folder), so a run folder goes straight into
:func:`dora_analysis.analyze`. The LoRA / DoRA layers are the project's own: peft is not
needed to train.

Example:
    >>> from dora_analysis.train import TrainConfig, train
    >>> train(TrainConfig(method="dora", out="runs/dora"))   # all-MiniLM-L6-v2, synthetic task
    >>> import dora_analysis as da
    >>> da.analyze(base_path, ["runs/dora"], modules=r"attention\\.self\\.query")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

# Imported on first use, so that ``dora-train --help`` starts without loading torch.
_EXPORTS = {
    "TrainConfig": "config",
    "TrainResult": "loop",
    "train": "loop",
    "LoRALinear": "layers",
    "DoRALinear": "layers",
    "EncoderClassifier": "model",
    "default_model_path": "model",
    "merged_state_dict": "model",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .config import TrainConfig
    from .layers import DoRALinear, LoRALinear
    from .loop import TrainResult, train
    from .model import EncoderClassifier, default_model_path, merged_state_dict


__getattr__ = lazy_exports(__name__, _EXPORTS)
