"""Figures of the magnitude / direction analysis, drawn seaborn's way.

Every function takes the analyzer's long-form DataFrame (one row per run, step and module;
see :func:`dora_analysis.analyze`) and column names, draws on the Axes it is given (or the
current one), and returns it; the grid versions return a :class:`seaborn.FacetGrid`. Nothing
here calls ``plt.show()`` or writes files: :mod:`dora_analysis.report` saves figures.

The headline figure is the paper's figure 2 (Liu et al., ICML 2024, section 4.1): dD on the x
axis, dM on the y axis, one point per (layer, checkpoint), checkpoints told apart by colour,
layers by their number, and an OLS line whose slope is the finding. FT | LoRA | DoRA sit
side by side with independent axes, because their ranges differ by an order of magnitude.

Correlations and slopes come from :mod:`dora_analysis.stats`, the same numbers as the summary
table; the fitted line's confidence band too (:func:`dora_analysis.stats.ols_band`).

Example:
    >>> import dora_analysis as da
    >>> from dora_analysis import plots
    >>> df = da.analyze("base/", ["runs/ft", "runs/lora", "runs/dora"])
    >>> g = plots.plot_md_grid(df, kinds=["query"])
    >>> g.savefig("figure2.png")
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.colors import to_hex
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from . import names, stats
from .paper import METHOD_ORDER, method_label

# Axis and legend labels for the analyzer's columns; ΔD / ΔM as in the paper.
LABELS: dict[str, str] = {
    "delta_d": "ΔD (direction change)",
    "delta_m": "ΔM (magnitude change)",
    "delta_m_signed": "signed ΔM (mean of m_t − m_0)",
    "base_norm": "mean base row norm",
    "step": "training step",
    "layer": "layer",
}


# Sequential palettes: checkpoints and layers are ordered, so their colours should be too.
STEP_PALETTE = "viridis_r"
LAYER_PALETTE = "plasma_r"
HEATMAP_CMAP = "rocket_r"

# A legend listing more checkpoints than this shows an evenly spaced subset (first and last kept).
MAX_LEGEND_ENTRIES = 8

Palette = str | Sequence[Any] | Mapping[Any, Any] | None


# --------------------------------------------------------------------------------------------
# Labels and ordering
# --------------------------------------------------------------------------------------------


def run_label(run: str, method: str | None = None) -> str:
    """A run's panel title: ``"LoRA"`` when the run is named after its method, else ``"seed1 (LoRA)"``."""
    if method is None or str(run).lower() == str(method).lower():
        return method_label(run)
    return f"{run} ({method_label(method)})"


def kind_order(data: pd.DataFrame) -> list[str]:
    """The matrix kinds of ``data`` in the order a block applies them (``q_proj`` before
    ``k_proj``, attention before the MLP; :func:`dora_analysis.names.kind_order`).

    Example:
        >>> kind_order(pd.DataFrame({"kind": ["down_proj", "q_proj", "down_proj"]}))
        ['q_proj', 'down_proj']
    """
    return names.kind_order(map(str, data["kind"]))


def run_order(data: pd.DataFrame) -> list[str]:
    """The runs of ``data`` in the paper's order: FT, LoRA, DoRA, then other methods.

    Runs of the same method keep their order of appearance (the analyzer's input order).

    Args:
        data: A frame with ``run`` and ``method`` columns.

    Returns:
        Run names, each once.

    Example:
        >>> run_order(pd.DataFrame({"run": ["d", "f"], "method": ["dora", "ft"]}))
        ['f', 'd']
    """
    firsts = data.drop_duplicates("run")[["run", "method"]]

    def rank(method: str) -> int:
        m = str(method).lower()
        return METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER)

    # sorted() is stable, so runs of one method stay in order of appearance.
    return [run for run, _ in sorted(zip(firsts["run"], firsts["method"]), key=lambda t: rank(t[1]))]


def _label(column: str) -> str:
    return LABELS.get(column, column)


def _point_labels(data: pd.DataFrame) -> list[str]:
    """The text beside each point: its layer number, or the module's last two name parts."""
    labels = []
    for layer, module in zip(data["layer"], data["module"]):
        if pd.isna(layer):
            labels.append(".".join(str(module).split(".")[-2:]))
        else:
            labels.append(str(int(layer)))
    return labels


def panel_title(run: str, method: str | None = None, kind: str | None = None) -> str:
    """The name of a panel, ``"LoRA · query"``: every facet of every figure is titled by this.

    Empty facets too (a run without that kind), so that a grid never mixes ``FT · query`` with
    seaborn's own ``run = lora``. What a panel adds below its name (the fit, the quantity) goes
    on a second line.

    Args:
        run: The run's name.
        method: Its method; the label is just ``"LoRA"`` when the run is named after it.
        kind: The matrix kind; None when the panel pools several kinds.

    Returns:
        E.g. ``"seed1 (DoRA) · q_proj"`` or ``"FT · all kinds"``.
    """
    return f"{run_label(run, method)} · {'all kinds' if kind is None else kind}"


def _panel_title(data: pd.DataFrame) -> str:
    """:func:`panel_title` of the one run a panel's rows belong to."""
    kinds = data["kind"].unique()
    return panel_title(data["run"].iloc[0], data["method"].iloc[0], str(kinds[0]) if len(kinds) == 1 else None)


def _mark_empty(ax: Axes, title: str) -> None:
    """An empty facet (a run without this kind, e.g. an adapter on query only): its title, and
    a word saying why nothing is drawn."""
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    ax.text(0.5, 0.5, "no matrices", ha="center", va="center", transform=ax.transAxes, color="0.5")


# --------------------------------------------------------------------------------------------
# Selecting and checking data
# --------------------------------------------------------------------------------------------


def _require(data: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in data.columns]
    if missing:
        raise ValueError(
            f"{what} needs the column(s) {missing}; got {list(data.columns)} (pass the DataFrame returned by dora_analysis.analyze)"
        )


def _check_values(data: pd.DataFrame, column: str, wanted: Sequence[str]) -> None:
    """Raise, naming what exists, if a requested run or kind is not in the data."""
    present = set(map(str, data[column].unique()))
    unknown = [w for w in wanted if str(w) not in present]
    if unknown:
        raise ValueError(f"no {column} {unknown} in the data; it has {sorted(present)}")


def _select(data: pd.DataFrame, *, run: str | None = None, kind: str | None = None) -> pd.DataFrame:
    """Rows of one run and/or one kind (None keeps all)."""
    for column, value in (("run", run), ("kind", kind)):
        if value is not None:
            _check_values(data, column, [value])
            data = data[data[column].astype(str) == str(value)]
    return data


def _finite(data: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Rows whose ``columns`` are all finite: NaN dD (all rows zero) has no place on an axis."""
    values = data[list(columns)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    return data[np.isfinite(values).all(axis=1)]


def _one_run(data: pd.DataFrame, what: str) -> None:
    """One panel, one run: a regression across FT and LoRA points would mean nothing."""
    runs = list(dict.fromkeys(map(str, data["run"])))
    if len(runs) > 1:
        raise ValueError(
            f"{what} draws one run, but the data holds {len(runs)} ({', '.join(runs)}): "
            "pass run=..., or draw them side by side with the grid version"
        )


# --------------------------------------------------------------------------------------------
# Colours and legends
# --------------------------------------------------------------------------------------------


def ordered_palette(levels: Sequence[Any], palette: Palette = STEP_PALETTE) -> dict[Any, str]:
    """A colour per level, in order: the first level lightest for sequential palettes.

    Args:
        levels: Ordered levels (steps, layers).
        palette: A seaborn/matplotlib palette name, a list of colours, or a ready mapping.

    Returns:
        ``{level: hex colour}``.

    Example:
        >>> colours = ordered_palette([100, 200, 300])
        >>> ax = sns.scatterplot(df, x="delta_d", y="delta_m", hue="step", palette=colours)
    """
    if isinstance(palette, Mapping):
        return {level: palette[level] for level in levels}
    # Sample n + 1 colours and drop the lightest, so the first level is never near-white.
    n = len(levels)
    colours = sns.color_palette(palette, n + 1)[1:] if isinstance(palette, str) else list(palette)
    if len(colours) < n:
        raise ValueError(f"palette has {len(colours)} colours for {n} levels")
    return {level: to_hex(c) for level, c in zip(levels, colours)}


def _levels(data: pd.DataFrame, column: str) -> list[Any]:
    """Sorted distinct non-missing values of a column (as plain Python scalars)."""
    values = data[column].dropna().unique()
    return sorted(v.item() if hasattr(v, "item") else v for v in values)


def _legend_handles(palette: Mapping[Any, str]) -> dict[str, Line2D]:
    """Marker handles for a hue legend, thinned to :data:`MAX_LEGEND_ENTRIES` evenly spaced levels."""
    levels = list(palette)
    if len(levels) > MAX_LEGEND_ENTRIES:
        keep = np.unique(np.linspace(0, len(levels) - 1, MAX_LEGEND_ENTRIES).round().astype(int))
        levels = [levels[i] for i in keep]
    return {str(level): Line2D([], [], linestyle="", marker="o", markersize=6, color=palette[level]) for level in levels}


# --------------------------------------------------------------------------------------------
# The fitted line (its statistics, band included, are in dora_analysis.stats)
# --------------------------------------------------------------------------------------------


def _fit_text(x: np.ndarray, y: np.ndarray) -> str:
    """``"r = -0.62 · slope = -2.1 · n = 24"``, with the summary table's numbers."""
    r, _ = stats.pearson(x, y)
    slope, _ = stats.ols(x, y)
    if not math.isfinite(r):
        return f"n = {len(x)}: too few distinct points for r"
    return f"r = {r:+.2f} · slope = {slope:.3g} · n = {len(x)}"


def _draw_fit(ax: Axes, x: np.ndarray, y: np.ndarray, *, ci: float | None, color: str = "0.2") -> np.ndarray:
    """Draw the OLS line (and its band) across the x range; return the line's y (empty if none)."""
    slope, intercept = stats.ols(x, y)
    if len(x) < 3 or not math.isfinite(slope):
        return np.empty(0)
    grid = np.linspace(x.min(), x.max(), 100)
    line = slope * grid + intercept
    ax.plot(grid, line, color=color, linewidth=1.5, zorder=1, label="OLS fit")
    if ci is not None:
        lo, hi = stats.ols_band(x, y, grid, level=ci / 100)
        ax.fill_between(grid, lo, hi, color=color, alpha=0.12, linewidth=0, zorder=0)
    return line


def _frame(ax: Axes, xs: np.ndarray, ys: np.ndarray, pad: float = 0.08) -> None:
    """Limits around the points and line, not the band: a wide band on few points would
    otherwise squash the data (and show negative ΔM, which cannot occur)."""
    for values, set_lim in ((xs, ax.set_xlim), (ys, ax.set_ylim)):
        lo, hi = float(values.min()), float(values.max())
        span = hi - lo or abs(hi) or 1.0
        set_lim(lo - pad * span, hi + pad * span)


# --------------------------------------------------------------------------------------------
# Figure 2: dM against dD
# --------------------------------------------------------------------------------------------


def plot_md(
    data: pd.DataFrame,
    *,
    run: str | None = None,
    kind: str | None = None,
    x: str = "delta_d",
    y: str = "delta_m",
    hue: str | None = "step",
    palette: Palette = None,
    annotate: bool = True,
    fit: bool = True,
    ci: float | None = 95,
    legend: bool = True,
    ax: Axes | None = None,
    **kwargs: Any,
) -> Axes:
    """The paper's figure 2 panel: dM against dD, one point per (layer, checkpoint).

    Points are coloured by ``hue`` (the checkpoint's step) with an ordered palette and
    labelled with their layer number; the OLS line of ``y`` on ``x`` is drawn with its
    confidence band, and the title gives Pearson r, the slope and n (the numbers of
    :func:`dora_analysis.summarize`). Rows whose ``x`` or ``y`` is not finite are left out.

    Args:
        data: The analyzer's DataFrame (columns ``run``, ``method``, ``kind``, ``layer``,
            ``module`` and the ``x``, ``y``, ``hue`` columns).
        run: Draw only this run. Required when ``data`` holds several runs.
        kind: Draw only this matrix kind (``"query"``, ``"q_proj"``...); None pools all kinds,
            like the summary's ``all`` row.
        x: Column on the x axis (the paper's: ``delta_d``).
        y: Column on the y axis (the paper's: ``delta_m``).
        hue: Column that colours the points (default ``step``); None for one colour.
        palette: Palette name, list of colours or ``{level: colour}``; default a sequential one.
        annotate: Write each point's layer number beside it.
        fit: Draw the OLS line (needs 3 or more points).
        ci: Confidence level of the band around the line, in percent; None for no band.
        legend: Draw a legend of the hue levels and the fitted line.
        ax: Axes to draw on; default the current Axes.
        **kwargs: Passed to :func:`seaborn.scatterplot` (``s``, ``marker``, ``alpha``...).

    Returns:
        The Axes drawn on.

    Raises:
        ValueError: Unknown run or kind, missing columns, several runs without ``run``, or
            no finite points left.

    Example:
        >>> ax = plot_md(df, run="lora", kind="query")
        >>> ax.figure.savefig("lora_query.png")
    """
    _require(data, ["run", "method", "kind", "layer", "module", x, y] + ([hue] if hue else []), "plot_md")
    data = _finite(_select(data, run=run, kind=kind), [x, y])
    if data.empty:
        raise ValueError(f"no finite {x}/{y} rows to plot for run={run!r}, kind={kind!r}")
    _one_run(data, "plot_md")
    ax = plt.gca() if ax is None else ax

    colours = ordered_palette(_levels(data, hue), palette or STEP_PALETTE) if hue else None
    scatter_kws: dict[str, Any] = {"s": 36, "edgecolor": "white", "linewidth": 0.5, "zorder": 2} | kwargs
    sns.scatterplot(data=data, x=x, y=y, hue=hue, palette=colours, legend=False, ax=ax, **scatter_kws)

    xs, ys = data[x].to_numpy(dtype=float), data[y].to_numpy(dtype=float)
    line = _draw_fit(ax, xs, ys, ci=ci) if fit else np.empty(0)
    if annotate:
        for text, px, py in zip(_point_labels(data), xs, ys):
            ax.annotate(text, (px, py), xytext=(3, 3), textcoords="offset points", fontsize=7, color="0.3")

    ax.set(xlabel=_label(x), ylabel=_label(y))
    ax.set_title(f"{_panel_title(data)}\n{_fit_text(xs, ys)}", fontsize=10)
    _frame(ax, xs, np.concatenate([ys, line]))  # with room for the layer labels at the edges
    if legend:
        handles = _legend_handles(colours) if colours else {}
        if line.size:
            handles |= _fit_handles(ci)
        ax.legend(handles.values(), handles.keys(), title=_label(hue) if hue else None, fontsize=8, title_fontsize=8)
    return ax


def _fit_handles(ci: float | None) -> dict[str, Any]:
    """Legend entries for the fitted line and, if drawn, its band."""
    line = Line2D([], [], color="0.2", linewidth=1.5)
    if ci is None:
        return {"OLS fit": line}
    return {f"OLS fit, {ci:g}% CI": (Patch(color="0.2", alpha=0.12, linewidth=0), line)}


def _facet(
    data: pd.DataFrame,
    *,
    runs: Sequence[str] | None,
    kinds: Sequence[str] | None,
    col_wrap: int | None,
    height: float,
    aspect: float,
) -> tuple[sns.FacetGrid, list[tuple[Axes, pd.DataFrame]]]:
    """A run x kind grid with independent axes, and each panel's Axes with its rows."""
    _require(data, ["run", "method", "kind"], "a run x kind grid")
    if runs is not None:
        _check_values(data, "run", runs)
    if kinds is not None:
        _check_values(data, "kind", kinds)
    runs = list(runs) if runs is not None else run_order(data)
    kinds = list(kinds) if kinds is not None else kind_order(data)
    # Taken before the selection: a run without the kinds asked for still has a method.
    method_of = dict(zip(data["run"].astype(str), data["method"], strict=True))
    data = data[data["run"].astype(str).isin(runs) & data["kind"].astype(str).isin(kinds)]
    row = "kind" if len(kinds) > 1 else None
    if col_wrap is not None and row is not None:
        raise ValueError(f"col_wrap needs a single kind, got {kinds}: pass kinds=[...] or draw one grid per kind")
    g = sns.FacetGrid(
        data,
        col="run",
        row=row,
        col_order=runs,
        row_order=kinds if row else None,
        col_wrap=col_wrap,
        # The paper's panels differ by an order of magnitude: each gets its own scale.
        sharex=False,
        sharey=False,
        height=height,
        aspect=aspect,
    )
    panels = []
    for (i, j, _), part in g.facet_data():
        ax = g.facet_axis(i, j, modify_state=False)
        if part.empty:
            run, kind = runs[j], kinds[i] if row else kinds[0]
            _mark_empty(ax, panel_title(run, method_of.get(str(run)), kind))
        else:
            panels.append((ax, part))
    return g, panels


def plot_md_grid(
    data: pd.DataFrame,
    *,
    runs: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    x: str = "delta_d",
    y: str = "delta_m",
    hue: str | None = "step",
    palette: Palette = None,
    annotate: bool = True,
    ci: float | None = 95,
    col_wrap: int | None = None,
    height: float = 3.4,
    aspect: float = 1.05,
    **kwargs: Any,
) -> sns.FacetGrid:
    """The paper's figure 2 for many runs: a :func:`plot_md` panel per run and matrix kind.

    Columns are runs (FT | LoRA | DoRA, as in the paper, then other methods), rows are matrix
    kinds (query, value...). Every panel has its own axis limits and its own regression line;
    one legend of the checkpoints (hue levels) is shared, with the same colour for a step in
    every panel.

    Args:
        data: The analyzer's DataFrame.
        runs: Runs to draw, in this order; default all, ordered by :func:`run_order`.
        kinds: Matrix kinds to draw, in this order; default all, in the order a block applies them (:func:`kind_order`).
        x: Column on the x axis (default ``delta_d``).
        y: Column on the y axis (default ``delta_m``).
        hue: Column colouring the points (default ``step``).
        palette: Palette for ``hue``; default a sequential one.
        annotate: Label points with their layer number.
        ci: Confidence level of the band, in percent; None for none.
        col_wrap: Wrap the runs into rows of this many panels (only with a single kind), e.g.
            3 with runs ordered ``ft-s0, lora-s0, dora-s0, ft-s1, ...`` for one row per seed.
        height: Height of each panel, in inches.
        aspect: Width / height of each panel.
        **kwargs: Passed to :func:`plot_md` for every panel (e.g. ``s=20``).

    Returns:
        The FacetGrid; ``g.axes`` holds the panels, ``g.figure`` the figure.

    Example:
        >>> g = plot_md_grid(df, kinds=["query"])
        >>> g.savefig("figure2.png", dpi=150)
    """
    g, panels = _facet(data, runs=runs, kinds=kinds, col_wrap=col_wrap, height=height, aspect=aspect)
    drawn = pd.concat([part for _, part in panels]) if panels else data.iloc[:0]
    # One palette for the whole grid, so a step has one colour everywhere.
    colours = ordered_palette(_levels(drawn, hue), palette or STEP_PALETTE) if hue else None
    for ax, part in panels:
        plot_md(part, x=x, y=y, hue=hue, palette=colours, annotate=annotate, ci=ci, legend=False, ax=ax, **kwargs)
    g.set_axis_labels(_label(x), _label(y))
    g.tight_layout()
    if colours:
        handles = _legend_handles(colours) | _fit_handles(ci)
        g.add_legend(legend_data=handles, title=_label(hue))
    return g


# --------------------------------------------------------------------------------------------
# Across training: trajectories and heatmaps
# --------------------------------------------------------------------------------------------


def plot_trajectories(
    data: pd.DataFrame,
    *,
    runs: Sequence[str] | None = None,
    kind: str | None = None,
    row: str = "run",
    hue: str = "layer",
    palette: Palette = None,
    height: float = 2.6,
    aspect: float = 1.5,
    **kwargs: Any,
) -> sns.FacetGrid:
    """dM and dD of every matrix across training steps, one line per module coloured by ``hue``.

    Two layouts, chosen by ``row``:

    - ``"run"``: a row per run, ΔM | ΔD columns. With several kinds the line style tells them
      apart, which reads for two or three kinds, not for LLaMA's seven.
    - ``"kind"``: a row per matrix kind, and for each run a ΔM and a ΔD column. One panel per
      kind, run and quantity, so nothing but the layer needs decoding; a run without a kind
      gets an empty, titled panel.

    Lines are coloured by ``hue`` (the layer, with an ordered palette so depth reads as shade).
    Each panel has its own y scale. Modules outside numbered blocks (no layer) are left out
    when ``hue`` is ``layer``.

    Args:
        data: The analyzer's DataFrame.
        runs: Runs to draw, in this order; default all, ordered by :func:`run_order`.
        kind: Draw only this matrix kind; None draws all.
        row: ``"run"`` or ``"kind"``: what each row of panels holds (see above).
        hue: Column colouring the lines (default ``layer``).
        palette: Palette for ``hue``; default a sequential one.
        height: Height of each panel, in inches.
        aspect: Width / height of each panel.
        **kwargs: Passed to :func:`seaborn.relplot` / :func:`seaborn.lineplot`.

    Returns:
        The FacetGrid (from :func:`seaborn.relplot`); ``g.axes[i, j]`` is row ``i``, column ``j``.

    Raises:
        ValueError: Unknown run, kind or ``row``; missing columns; no rows with a ``hue``.

    Example:
        >>> g = plot_trajectories(df, kind="query")
        >>> g = plot_trajectories(df, runs=["ft"], row="kind")  # LLaMA's seven kinds, one per row
        >>> g.savefig("trajectories.png")
    """
    if row not in ("run", "kind"):
        raise ValueError(f"row must be 'run' or 'kind', got {row!r}")
    _require(data, ["run", "method", "kind", "module", "step", "delta_m", "delta_d", hue], "plot_trajectories")
    data = _select(data, kind=kind).dropna(subset=[hue])
    if runs is not None:
        _check_values(data, "run", runs)
    runs = list(runs) if runs is not None else run_order(data)
    data = data[data["run"].astype(str).isin(runs)]
    if data.empty:
        raise ValueError(f"no rows with a {hue} to draw (modules outside numbered blocks have none: try hue='module')")

    # Long form: one row per (module, step, quantity), so ΔM and ΔD become facet columns.
    quantities = {"delta_m": _label("delta_m"), "delta_d": _label("delta_d")}
    long = data.melt(
        id_vars=["run", "method", "kind", "module", "step", hue],
        value_vars=list(quantities),
        var_name="quantity",
        value_name="value",
    )
    if hue == "layer":
        long["layer"] = long["layer"].astype(int)  # Int64 -> int: plain levels for the palette
    kinds = kind_order(data)
    # Each panel as (run, kind or None for all, quantity), laid out in rows and columns.
    if row == "run":
        pooled = None if len(kinds) > 1 else kinds[0]
        cells = [[(r, pooled, q) for q in quantities] for r in runs]
        long["_row"] = long["run"].map(runs.index)
        long["_col"] = long["quantity"].map(list(quantities).index)
    else:
        cells = [[(r, k, q) for r in runs for q in quantities] for k in kinds]
        long["_row"] = long["kind"].astype(str).map(kinds.index)
        long["_col"] = long["run"].map(runs.index) * len(quantities) + long["quantity"].map(list(quantities).index)

    line_kws: dict[str, Any] = {"marker": "o", "markersize": 4, "linewidth": 1.2} | kwargs
    g = sns.relplot(
        data=long,
        kind="line",
        x="step",
        y="value",
        hue=hue,
        palette=ordered_palette(_levels(long, hue), palette or LAYER_PALETTE),
        style="kind" if row == "run" and len(kinds) > 1 else None,
        units="module",
        estimator=None,  # one line per module, no averaging across modules
        row="_row",
        col="_col",
        row_order=list(range(len(cells))),
        col_order=list(range(len(cells[0]))),
        height=height,
        aspect=aspect,
        facet_kws={"sharey": False},
        **line_kws,
    )
    method_of = dict(zip(data["run"], data["method"], strict=True))
    present = set(zip(long["run"], long["kind"].astype(str), strict=True))
    for i, cells_i in enumerate(cells):
        for j, (r, k, q) in enumerate(cells_i):
            title = f"{panel_title(r, method_of[r], k)}\n{quantities[q]}"
            if k is not None and (r, k) not in present:
                _mark_empty(g.axes[i, j], title)
            else:
                g.axes[i, j].set_title(title, fontsize=10)
    steps = _levels(long, "step")
    if len(steps) <= 6:  # a tick at each checkpoint, not at round numbers between them
        g.set(xticks=steps)
    g.set_axis_labels(_label("step"), "")
    g.tight_layout()
    return g


def plot_heatmap(
    data: pd.DataFrame,
    *,
    value: str = "delta_d",
    run: str | None = None,
    kind: str | None = None,
    cmap: str = HEATMAP_CMAP,
    annot: bool | None = None,
    fmt: str = ".2g",
    ax: Axes | None = None,
    **kwargs: Any,
) -> Axes:
    """A layer x step heatmap of one quantity (dD by default, or dM) for one run and kind.

    Rows are layers (top = first), columns are checkpoints. When two modules share a layer
    number and kind (an encoder and a decoder), rows are modules instead.

    Args:
        data: The analyzer's DataFrame.
        value: Column to show: ``delta_d``, ``delta_m``, ``delta_m_signed``...
        run: The run to show; required when ``data`` holds several.
        kind: The matrix kind to show; required when ``data`` holds several.
        cmap: Colormap (sequential by default: larger change, darker cell).
        annot: Write the value in each cell; default when there are at most 80 cells.
        fmt: Number format of the cell values.
        ax: Axes to draw on; default the current Axes.
        **kwargs: Passed to :func:`seaborn.heatmap`.

    Returns:
        The Axes drawn on.

    Example:
        >>> ax = plot_heatmap(df, value="delta_m", run="dora", kind="query")
    """
    _require(data, ["run", "method", "kind", "module", "layer", "step", value], "plot_heatmap")
    data = _select(data, run=run, kind=kind)
    _one_run(data, "plot_heatmap")
    if data["kind"].nunique() > 1:
        raise ValueError(f"plot_heatmap draws one kind, but the data holds {sorted(data['kind'].unique())}: pass kind=...")
    table = _layer_step_table(data, value)
    if table.empty:
        raise ValueError(f"no {value} values to draw for run={run!r}, kind={kind!r}")
    ax = plt.gca() if ax is None else ax
    if annot is None:
        annot = table.size <= 80
    heat_kws: dict[str, Any] = {"cbar_kws": {"label": _label(value)}, "linewidths": 0.5, "annot_kws": {"fontsize": 7}}
    sns.heatmap(table, cmap=cmap, annot=annot, fmt=fmt, ax=ax, **(heat_kws | kwargs))
    ax.set(xlabel=_label("step"), ylabel=table.index.name)
    ax.set_title(_panel_title(data), fontsize=10)
    return ax


def _layer_step_table(data: pd.DataFrame, value: str) -> pd.DataFrame:
    """``value`` pivoted to rows = layer (or module, if layers repeat) and columns = step."""
    by_layer = data.dropna(subset=["layer"])
    if not by_layer.empty and not by_layer.duplicated(["layer", "step"]).any():
        table = by_layer.pivot(index="layer", columns="step", values=value)
        table.index = table.index.astype(int)
        return table.sort_index()
    ordered = data.sort_values(["layer", "module"], kind="stable")
    return ordered.pivot(index="module", columns="step", values=value).reindex(ordered["module"].unique())


def plot_heatmap_grid(
    data: pd.DataFrame,
    *,
    value: str = "delta_d",
    runs: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    col_wrap: int | None = None,
    height: float = 3.0,
    aspect: float = 1.2,
    **kwargs: Any,
) -> sns.FacetGrid:
    """:func:`plot_heatmap` for every run (columns) and kind (rows), each with its own scale.

    Args:
        data: The analyzer's DataFrame.
        value: Column to show (default ``delta_d``; ``delta_m`` for magnitudes).
        runs: Runs to draw, in this order; default all, ordered by :func:`run_order`.
        kinds: Kinds to draw, in this order; default all, in the order a block applies them (:func:`kind_order`).
        col_wrap: Wrap the runs into rows of this many panels (only with a single kind).
        height: Height of each panel, in inches.
        aspect: Width / height of each panel.
        **kwargs: Passed to :func:`plot_heatmap` (``cmap``, ``annot``...).

    Returns:
        The FacetGrid.

    Example:
        >>> g = plot_heatmap_grid(df, value="delta_m", kinds=["query"])
    """
    g, panels = _facet(data, runs=runs, kinds=kinds, col_wrap=col_wrap, height=height, aspect=aspect)
    for ax, part in panels:
        plot_heatmap(part, value=value, ax=ax, **kwargs)
    g.tight_layout()
    return g


# --------------------------------------------------------------------------------------------
# Spectral views (the spectrum, intruders and amplification metrics; pairs.csv)
# --------------------------------------------------------------------------------------------


def plot_intruders(data: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Intruder dimensions per layer, one bar per run (FT | LoRA | DoRA side by side).

    Each bar is the mean ``intruders`` count over the layer's matrices at the run's last step.

    Args:
        data: The analyzer's frame with the ``intruders`` metric's columns.
        ax: Axes to draw on (default: a new figure's).
    """
    _require(data, ["run", "step", "layer", "intruders"], "plot_intruders")
    last = data[data["step"] == data.groupby("run")["step"].transform("max")]
    last = last[last["layer"].notna()]
    ax = ax if ax is not None else plt.subplots(figsize=(7, 3.2))[1]
    runs = [r for r in run_order(data) if r in set(last["run"])]
    means = last.groupby(["layer", "run"])["intruders"].mean().unstack("run").reindex(columns=runs)
    layers = list(means.index)
    width = 0.8 / max(len(runs), 1)
    for i, run in enumerate(runs):
        method = str(data.loc[data["run"] == run, "method"].iloc[0])
        ax.bar(np.arange(len(layers)) + (i - (len(runs) - 1) / 2) * width, means[run].to_numpy(), width, label=run_label(run, method))
    ax.set_xticks(np.arange(len(layers)), [str(int(x)) for x in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("intruder dimensions (mean per matrix)")
    ax.legend(frameon=False, fontsize="small")
    return ax


def plot_stable_rank(data: pd.DataFrame, *, value: str = "dw_stable_rank", ax: Axes | None = None) -> Axes:
    """A spectrum column (stable rank by default) across training steps, one line per run:
    the mean over matrices, with its 95% interval."""
    _require(data, ["run", "step", value], "plot_stable_rank")
    ax = ax if ax is not None else plt.subplots(figsize=(5, 3.2))[1]
    for run in run_order(data):
        part = data[data["run"] == run]
        method = str(part["method"].iloc[0])
        sns.lineplot(part, x="step", y=value, errorbar=("ci", 95), marker="o", ax=ax, label=run_label(run, method))
    ax.set_ylabel(_label(value))
    ax.legend(frameon=False, fontsize="small")
    return ax


def plot_update_spectra(spectra: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """The singular values of the update dW per run (FT | LoRA | DoRA), at each run's last step.

    Each line is the median over matrices of sigma_i / sigma_1 against i, on a log scale: a
    LoRA update stops at its rank r, a full fine-tune's decays over many more.

    Args:
        spectra: :func:`dora_analysis.analysis.update_spectra` (``spectra.csv``).
        ax: Axes to draw on (default: a new figure's).
    """
    _require(spectra, ["run", "method", "step", "module", "i", "sigma"], "plot_update_spectra")
    last = spectra[spectra["step"] == spectra.groupby("run")["step"].transform("max")]
    top = last.groupby(["run", "module"])["sigma"].transform("max")
    last = last.assign(rel=last["sigma"] / top.where(top > 0))
    ax = ax if ax is not None else plt.subplots(figsize=(5, 3.2))[1]
    for run in run_order(last):
        part = last[last["run"] == run]
        curve = part.groupby("i")["rel"].median()
        curve = curve[curve > 0]
        ax.plot(curve.index, curve.to_numpy(), marker=".", label=run_label(run, str(part["method"].iloc[0])))
    ax.set_yscale("log")
    ax.set_xlabel("i (singular values of dW, largest first)")
    ax.set_ylabel("σᵢ / σ₁ (median over matrices)")
    ax.legend(frameon=False, fontsize="small")
    return ax


def plot_subspace_similarity(pairs: pd.DataFrame, *, ax: Axes | None = None, **heatmap: Any) -> Axes:
    """phi(i, j) of ``pairs.csv`` as a heatmap, averaged over the rows given (filter first to
    one pair of runs or steps; Hu et al. 2021, LoRA, figures 3-4)."""
    _require(pairs, ["i", "j", "phi"], "plot_subspace_similarity")
    grid = pairs.groupby(["i", "j"])["phi"].mean().unstack("j")
    ax = ax if ax is not None else plt.subplots(figsize=(4.2, 3.6))[1]
    sns.heatmap(grid, vmin=0, vmax=1, cmap="viridis", ax=ax, cbar_kws={"label": "φ(i, j)"}, **heatmap)
    ax.invert_yaxis()
    return ax
