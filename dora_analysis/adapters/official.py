"""The official DoRA code's adapters (NVlabs/DoRA, ``commonsense_reasoning/peft``, a PEFT 0.3 fork).

Layout: a PEFT-style folder, ``adapter_config.json`` (``"peft_type": "DORA"``, ``r``,
``lora_alpha``, ``target_modules``, ``Wdecompose_target_modules``) beside
``adapter_model.bin``, with keys

* ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight`` ``[out, r]``;
* ``base_model.model.<module>.weight_m_wdecomp.weight`` ``[out, 1]``: the magnitude m, stored
  as the weight of ``nn.Linear(1, out_features, bias=False)``.

Its merge is the paper's eq. 5 with one norm per output feature, the norm taken along
``dim=1`` of the ``[out, in]`` weight (the official
``peft/tuners/dora.py`` takes ``torch.linalg.norm(..., dim=1)``, as PEFT does)::

    V  = W0 + (lora_alpha / r) * B @ A
    W' = m * V / ||V||_row

Modules tuned for magnitude only (``Wdecompose_target_modules``, paper table 6) have no
``lora_A`` / ``lora_B`` and merge to ``m * W0 / ||W0||_row``. Nothing in the tensors gives
``lora_alpha / r``, so the scale comes from the ``adapter_config.json`` that the fork's
``save_pretrained`` writes beside the weights; without it the adapter is refused.
"""

from __future__ import annotations

import math

from .peft import PeftLora
from .snapshot import Target

OFFICIAL_MAGNITUDE = "weight_m_wdecomp.weight"


class OfficialDora(PeftLora):
    """A DoRA adapter saved by the official DoRA code (magnitude ``weight_m_wdecomp.weight``)."""

    PARAMS = ("lora_A.weight", "lora_B.weight", OFFICIAL_MAGNITUDE)
    MAGNITUDE = (OFFICIAL_MAGNITUDE,)

    def _check_config(self) -> None:
        if self.config.get("fan_in_fan_out"):
            # The fork takes `torch.linalg.norm(new_weight_v, dim=1)` of the *stored* weight, so
            # on an [in, out] layer m would run along the inputs: not a layout it could train.
            raise self._error("fan_in_fan_out=true is not supported for the official DoRA layout")

    def _method(self) -> str:
        return "dora"

    def _target(self, module: str, params: dict[str, str]) -> Target:
        if "lora_A.weight" in params or "lora_B.weight" in params:
            return super()._target(module, params)
        # Magnitude only: m [out, 1], no A or B; the base supplies in_features.
        magnitude = params[OFFICIAL_MAGNITUDE]
        shape = self.store.shape(magnitude)
        if len(shape) == 0 or math.prod(shape) != shape[0]:
            raise self._error(f"magnitude has shape {list(shape)}, expected [out, 1]", key=magnitude)
        return Target(out_features=shape[0], in_features=None, down=None, up=None, magnitude=magnitude, transposed=False)
