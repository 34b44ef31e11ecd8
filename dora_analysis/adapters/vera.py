"""PEFT VeRA adapters (``peft_type: VERA``): frozen shared random projections, trained scalings.

Keys (``save_pretrained`` of a ``VeraModel``):

* ``base_model.model.<module>.vera_lambda_b`` ``[out]`` and ``...vera_lambda_d`` ``[r]``;
* ``base_model.vera_A`` ``[r, max_in]`` and ``base_model.vera_B`` ``[max_out, r]``, shared by
  all layers, present only with ``save_projection=True`` (the default).

PEFT's merge (``peft/tuners/vera/layer.py``, ``Linear.get_delta_weight``)::

    sliced_A = vera_A[:, : self.in_features]
    sliced_B = vera_B[: self.out_features, :]
    output_tensor = transpose((lambda_b * sliced_B) @ (lambda_d * sliced_A), self.fan_in_fan_out)

so VeRA is a low-rank update with B = lambda_b·B_shared, A = lambda_d·A_shared and s = 1,
merged by the same code as LoRA. Without saved projections they are drawn again exactly as
PEFT draws them, from ``projection_prng_key``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..containers import TensorStore
from .merge import LowRankUpdate
from .peft import PeftAdapter
from .snapshot import Layout, Target

VERA_A, VERA_B = "base_model.vera_A", "base_model.vera_B"


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's ``_kaiming_init`` (``peft/tuners/vera/model.py``), draw for draw.

    ``fan = _calculate_correct_fan(tensor, "fan_in")`` is ``shape[1]`` for a matrix; then
    ``gain = math.sqrt(2)``, ``std = gain / math.sqrt(fan)``, ``bound = math.sqrt(3.0) * std``
    and ``tensor.uniform_(-bound, bound, generator=generator)``.
    """
    gain = math.sqrt(2)
    std = gain / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def regenerate_projections(seed: int, rank: int, max_out: int, max_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(vera_A [rank, max_in], vera_B [max_out, rank])`` as ``VeraModel._init_vera_A_vera_B`` draws them.

    PEFT: ``generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)``,
    then ``vera_A = _kaiming_init((config.r, linear_in_dim), generator=generator)`` and
    ``vera_B = _kaiming_init((linear_out_dim, config.r), generator=generator)``, in that order,
    where ``(linear_out_dim, linear_in_dim)`` is the largest shape over the targeted layers.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    vera_a = kaiming_uniform((rank, max_in), generator)
    vera_b = kaiming_uniform((max_out, rank), generator)
    return vera_a, vera_b


class PeftVera(PeftAdapter):
    """A PEFT VeRA adapter: ΔW = (lambda_b · B[:out]) @ (lambda_d · A[:, :in])."""

    PARAMS = ("vera_lambda_b", "vera_lambda_d")
    SHARED = frozenset({VERA_A, VERA_B})

    def __init__(self, path: Path, config: dict[str, Any], store: TensorStore) -> None:
        super().__init__(path, config, store)
        self._projections: tuple[torch.Tensor, torch.Tensor] | None = None

    def _method(self) -> str:
        return "vera"

    @property
    def rank(self) -> int:
        """``r`` from the config (VeraConfig's default: 256)."""
        return int(self.config.get("r", 256))

    def _target(self, module: str, params: dict[str, str]) -> Target:
        lambda_b, lambda_d = params.get("vera_lambda_b"), params.get("vera_lambda_d")
        if lambda_b is None or lambda_d is None:
            missing = "vera_lambda_b" if lambda_b is None else "vera_lambda_d"
            raise self._error(f"{module} has no {missing}", key=lambda_b or lambda_d)
        b_shape, d_shape = self.store.shape(lambda_b), self.store.shape(lambda_d)
        if len(b_shape) != 1 or tuple(d_shape) != (self.rank,):
            raise self._error(
                f"vera_lambda_b {list(b_shape)} / vera_lambda_d {list(d_shape)}: expected [out] and [r={self.rank}]",
                key=lambda_d,
            )
        return Target(out_features=b_shape[0], in_features=None, down=lambda_d, up=lambda_b, scale=1.0)

    def bind(self, base: TensorStore) -> set[str]:
        """As :meth:`AdapterSnapshot.bind`, then load or regenerate the shared projections."""
        names = super().bind(base)
        max_out = max(t.out_features for t in self.targets.values())
        max_in = max(layout.in_features for layout in self._layouts.values())
        self._projections = self._load_projections(max_out, max_in)
        return names

    def _load_projections(self, max_out: int, max_in: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The saved ``vera_A`` / ``vera_B``, checked, or PEFT's draw from ``projection_prng_key``."""
        saved = [k for k in (VERA_A, VERA_B) if k in self.store]
        if not saved:
            if self.config.get("save_projection", True):
                raise self._error(
                    f"save_projection=true in the config, but the file has no {VERA_A} / {VERA_B}",
                    hint="the adapter file is incomplete; re-save it",
                )
            return regenerate_projections(int(self.config.get("projection_prng_key", 0)), self.rank, max_out, max_in)
        if len(saved) == 1:
            raise self._error(f"the file has {saved[0]} but not its pair", key=saved[0])
        vera_a, vera_b = self.store.get(VERA_A).float(), self.store.get(VERA_B).float()
        if vera_a.shape[0] != self.rank or vera_a.shape[1] < max_in:
            raise self._error(f"vera_A is {list(vera_a.shape)}, expected [{self.rank}, >= {max_in}]", key=VERA_A)
        if vera_b.shape[1] != self.rank or vera_b.shape[0] < max_out:
            raise self._error(f"vera_B is {list(vera_b.shape)}, expected [>= {max_out}, {self.rank}]", key=VERA_B)
        return vera_a, vera_b

    def _update(self, module: str, layout: Layout) -> LowRankUpdate:
        assert self._projections is not None, "bind() first"
        vera_a, vera_b = self._projections
        target = self.targets[module]
        lambda_d = self.store.get(target.down).float()  # type: ignore[arg-type]
        lambda_b = self.store.get(target.up).float()  # type: ignore[arg-type]
        return LowRankUpdate(
            down=lambda_d.unsqueeze(-1) * vera_a[:, : layout.in_features],
            up=lambda_b.unsqueeze(-1) * vera_b[: target.out_features, :],
            scale=1.0,
        )
