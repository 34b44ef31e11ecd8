"""dora-analysis: the DoRA paper's magnitude / direction analysis of fine-tuned weights.

Quick start::

    import dora_analysis as da
    df = da.analyze("base/", ["runs/ft", "runs/lora", "runs/dora"])
    da.summarize(df)

The public names below are imported on first use, so that ``dora-analyze --help`` and other
light entry points start without loading torch and pandas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "analyze": "analysis",
    "summarize": "summary",
    "magnitude_direction": "summary",
    "compare": "decompose",
    "magnitude": "decompose",
    "delta_magnitude": "decompose",
    "delta_direction": "decompose",
    "InputError": "errors",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .analysis import analyze
    from .decompose import compare, delta_direction, delta_magnitude, magnitude
    from .errors import InputError
    from .summary import magnitude_direction, summarize


__getattr__ = lazy_exports(__name__, _EXPORTS)
