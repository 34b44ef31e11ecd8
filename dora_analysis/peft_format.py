"""PEFT's adapter folder on disk: file names, key layout and the adapter scale, written once.

The adapter reader (:mod:`dora_analysis.adapters.peft`) and the trainer's checkpoint writer
(:mod:`dora_analysis.train.checkpoint`) both use these, so what the trainer writes is what the
reader expects. Plain names and arithmetic, no torch: any layer of the package may import it.

A LoRA / DoRA adapter folder, as ``PeftModel.save_pretrained`` writes it::

    adapter_config.json          LoraConfig fields (r, lora_alpha, use_rslora, use_dora, ...)
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight          [r, in]
                                 base_model.model.<module>.lora_B.weight          [out, r]
                                 base_model.model.<module>.lora_magnitude_vector  [out]  (DoRA)
"""

from __future__ import annotations

import math

from .names import PEFT_PREFIX

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
# The weight files a folder may hold, in the order a reader prefers them (PEFT writes
# safetensors by default; older versions and ``safe_serialization=False`` write .bin).
ADAPTER_WEIGHTS: tuple[str, ...] = (ADAPTER_SAFETENSORS, ADAPTER_BIN)

# Every key starts with PEFT_PREFIX (defined with the other wrapper prefixes, in names).

# DoRA's magnitude m is saved without ".weight": "we want the state_dict format not to change,
# we remove the "weight" part" (``LoraModel._get_adapter_state_dict``).
LORA_A, LORA_B, MAGNITUDE = "lora_A.weight", "lora_B.weight", "lora_magnitude_vector"


def peft_key(module: str, param: str) -> str:
    """The key of one saved tensor: ``peft_key("encoder.q", "lora_A.weight")`` -> ``"base_model.model.encoder.q.lora_A.weight"``."""
    return f"{PEFT_PREFIX}{module}.{param}"


def lora_scale(alpha: float, rank: int, *, rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT ``LoraLayer.update_layer``).

    Args:
        alpha: ``lora_alpha``.
        rank: r, the rank of the update.
        rslora: Rank-stabilised scaling (Kalajdzievski 2023), PEFT's ``use_rslora``.

    Returns:
        The factor s in W' = W0 + s·B·A.
    """
    return alpha / math.sqrt(rank) if rslora else alpha / rank
