"""What the DoRA paper reports, and the names the toolkit shows for methods: each written once.

Liu et al., *DoRA: Weight-Decomposed Low-Rank Adaptation*, ICML 2024, figure 2: Pearson r of
dM against dD over the query matrices of 6 layers at 4 checkpoints. Plain data, no imports,
so every layer of the package (statistics, plots, report, commands) can read it.
"""

from __future__ import annotations

# Figure 2's correlations, by method.
PAPER_R: dict[str, float] = {"ft": -0.62, "lora": 0.83, "dora": -0.31}
# The sign each method shows in figure 2 (+1 positive, -1 negative).
EXPECTED_SIGN: dict[str, int] = {m: (1 if r > 0 else -1) for m, r in PAPER_R.items()}
# The setting figure 2 plots, for captions that compare it with the data at hand.
PAPER_SETTING = "query matrices of 6 layers at 4 checkpoints"
# Matrix kinds that are "the query" in common models (BERT, LLaMA, T5, diffusers, DistilBERT).
PAPER_KINDS: tuple[str, ...] = ("query", "q_proj", "q", "to_q", "q_lin")

# Display names of the methods, and figure 2's order, left to right.
METHOD_LABELS: dict[str, str] = {"ft": "FT", "lora": "LoRA", "dora": "DoRA", "vera": "VeRA", "dvora": "DVoRA"}
METHOD_ORDER: tuple[str, ...] = ("ft", "lora", "dora")


def method_label(method: str) -> str:
    """Display name of a method: ``"lora"`` -> ``"LoRA"``; unknown methods are returned as is."""
    return METHOD_LABELS.get(str(method).lower(), str(method))


def is_paper_kind(kind: str) -> bool:
    """True for a matrix kind that plays the role of figure 2's query matrices."""
    return str(kind).split(".")[-1] in PAPER_KINDS
