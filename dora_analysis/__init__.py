"""dora-analysis: the DoRA paper's magnitude / direction analysis of fine-tuned weights.

Quick start::

    import dora_analysis as da
    df = da.analyze("base/", ["runs/ft", "runs/lora", "runs/dora"])
    da.summarize(df)
"""

from __future__ import annotations

from .analyze import analyze, summarize
from .decompose import compare, delta_direction, delta_magnitude, magnitude
from .errors import InputError

__all__ = [
    "analyze",
    "summarize",
    "compare",
    "magnitude",
    "delta_magnitude",
    "delta_direction",
    "InputError",
]
__version__ = "0.1.0"
