"""A report a person can read or send on: ``report.md``, a self-contained ``report.html``, figures.

:func:`write_report` turns the analyzer's two tables (per-matrix rows and the summary) into
``figures/*.{png,svg,pdf}``, a Markdown report that renders on GitHub (figures linked
relatively) and an HTML page with every figure embedded, which opens anywhere offline.

Both documents come from one list of blocks (headings, paragraphs, lists, tables, figures)
rendered twice, so they always say the same thing. The numbers are the summary's; the words
(``"strong negative"``) come from :func:`dora_analysis.stats.strength`.

Example:
    >>> import dora_analysis as da
    >>> from dora_analysis.report import write_report
    >>> layers = da.analyze("base/", ["runs/ft", "runs/lora", "runs/dora"])
    >>> write_report(Path("out"), layers, da.summarize(layers), paper={"ft": -0.62, "lora": 0.83, "dora": -0.31})
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from . import __version__
from . import plots as plotting
from .metrics import Metric, metrics_of
from .metrics.md import MagnitudeDirection
from .paper import PAPER_SETTING, is_paper_kind, method_label
from .stats import has_sign, strength
from .summary import in_block_order, magnitude_direction

FORMATS = ("png", "svg", "pdf")
DPI = 150


# Files the CLI writes beside the report; linked when present, never assumed.
DATA_FILES = {
    "layers.csv": "one row per run, step and matrix",
    "summary.csv": "the summary table",
    "summary.json": "the summary table, as JSON",
    "pairs.csv": "subspace similarity phi(i, j) between every two tuned versions of each matrix",
}


# --------------------------------------------------------------------------------------------
# Words for numbers
# --------------------------------------------------------------------------------------------


def _num(v: object, spec: str) -> str:
    """``format(v, spec)``, or ``n/a`` for missing and non-finite values."""
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "n/a"
    return format(f, spec) if math.isfinite(f) else "n/a"


def _r(v: object) -> str:
    return _num(v, "+.2f")


def _p(v: object) -> str:
    return _num(v, ".2g")


def describe_correlation(r: float, *, ci_low: float = math.nan, ci_high: float = math.nan, n: int | None = None) -> str:
    """Pearson r in plain language: strength and sign, its interval, and whether that excludes 0.

    Args:
        r: Pearson correlation of dM with dD.
        ci_low: Lower end of its 95% interval (NaN if unknown).
        ci_high: Upper end of its 95% interval (NaN if unknown).
        n: Number of points, if it should be stated.

    Returns:
        E.g. ``"strong negative (r = -0.62)"``; with an interval that includes 0,
        ``"moderate negative (r = -0.48, 95% CI [-0.65, +0.38]); the interval includes 0, so the
        sign is not established"``.

    Example:
        >>> describe_correlation(0.83, n=24)
        'strong positive (r = +0.83, n = 24)'
    """
    if not math.isfinite(r):
        return "undefined (fewer than 3 distinct points)" if n is None else f"undefined (n = {n}: too few distinct points)"
    word = strength(r)
    numbers = [f"r = {_r(r)}"]
    has_ci = math.isfinite(ci_low) and math.isfinite(ci_high)
    if has_ci:
        numbers.append(f"95% CI [{_r(ci_low)}, {_r(ci_high)}]")
    if n is not None:
        numbers.append(f"n = {n}")
    text = f"{'no correlation' if word == 'none' else word} ({', '.join(numbers)})"
    if has_ci and ci_low < 0 < ci_high:
        text += "; the interval includes 0, so the sign is not established"
    return text


def _get(row: Mapping[str, object], key: str) -> float:
    """A float from a summary row; NaN when the column is absent (older summaries)."""
    v = row.get(key, math.nan)
    return math.nan if v is None or pd.isna(v) else float(v)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# The document model, rendered to Markdown and to HTML
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    """Plain text; `backticks` mark code in both renderings."""

    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class FigureBlock:
    """A saved figure under its own heading: ``path`` relative to the report, and a copy to embed."""

    path: str
    title: str
    caption: str
    mime: str  # of ``data``: image/png or image/svg+xml
    data: bytes
    # Width to show it at, in CSS pixels; None for the image's own. See _css_width.
    width: int | None = None

    @property
    def alt(self) -> str:
        return self.title.replace("`", "")


@dataclass(frozen=True)
class FileLinks:
    """Data files beside the report: ``(relative path, what it holds)``, linked relatively in
    both renderings. Both documents are written into the folder that holds these files, so the
    links work wherever the folder is opened; figures are embedded in the HTML, data is not."""

    files: tuple[tuple[str, str], ...]


Block = Heading | Paragraph | Bullets | Table | FigureBlock | FileLinks


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(title: str, blocks: Sequence[Block]) -> str:
    """The report as GitHub-flavoured Markdown; figures are relative links."""
    out = [f"# {title}", ""]
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Paragraph):
            out += [b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Table):
            out.append("| " + " | ".join(map(_md_cell, b.header)) + " |")
            out.append("|" + "|".join("---" for _ in b.header) + "|")
            out += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in b.rows]
            out.append("")
        elif isinstance(b, FigureBlock):
            # PDFs do not render inline in Markdown viewers: link them instead of embedding.
            image = f"[{b.path}]({b.path})" if b.path.endswith(".pdf") else f"![{b.alt}]({b.path})"
            out += [f"### {b.title}", "", image, "", f"*{b.caption}*", ""]
        elif isinstance(b, FileLinks):
            out += [f"- [`{name}`]({name}): {what}" for name, what in b.files] + [""]
    return "\n".join(out)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.5; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
code { background: #f3f3f3; padding: 0 0.2em; border-radius: 3px; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.9em; }
"""


def _html_inline(text: str) -> str:
    """Escape text, then turn `code` spans into <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


def render_html(title: str, blocks: Sequence[Block]) -> str:
    """The report as one self-contained HTML page: figures inlined as data URIs, CSS inline."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{_html_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            body.append(f"<p>{_html_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            body.append("<ul>" + "".join(f"<li>{_html_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(b, FigureBlock):
            uri = f"data:{b.mime};base64,{base64.b64encode(b.data).decode('ascii')}"
            width = f' width="{b.width}"' if b.width else ""
            body.append(
                f"<h3>{_html_inline(b.title)}</h3>"
                f'<figure><img src="{uri}"{width} alt="{html.escape(b.alt)}">'
                f"<figcaption>{_html_inline(b.caption)}</figcaption></figure>"
            )
        elif isinstance(b, FileLinks):
            items = "".join(f'<li><a href="{html.escape(n)}"><code>{html.escape(n)}</code></a>: {html.escape(w)}</li>' for n, w in b.files)
            body.append(f"<ul>{items}</ul>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    """A file-name-safe version of a kind (``self_attn.q_proj`` -> ``self_attn_q_proj``)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", str(text)).strip("_") or "all"


def _save(fig: Figure, path: Path, fmt: str) -> bytes:
    """Save ``fig`` to ``path`` and return what the HTML page embeds (PNG or SVG bytes)."""
    # No dates or random ids in the files: the same data gives byte-identical figures,
    # which keeps committed reference figures stable.
    metadata = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}.get(fmt, {})
    with matplotlib.rc_context({"svg.hashsalt": "dora-analysis"}):
        fig.savefig(path, format=fmt, dpi=DPI, bbox_inches="tight", metadata=metadata)
    if fmt in ("png", "svg"):
        return path.read_bytes()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _css_width(data: bytes, mime: str) -> int | None:
    """The width that shows a PNG at its size in inches (96 CSS pixels to the inch).

    Shown at one image pixel per CSS pixel, a wide grid would be shrunk to the page and a
    narrow one not, so the same 10-point label would read at a different size in every figure.
    SVGs carry their size in points and need nothing.
    """
    if mime != "image/png" or data[12:16] != b"IHDR":
        return None
    return round(int.from_bytes(data[16:20], "big") * 96 / DPI)


def _figure2_layout(layers: pd.DataFrame) -> tuple[list[str], int | None]:
    """Run order and wrap for the figure-2 grid: FT | LoRA | DoRA in each row.

    With several runs per method (seeds), runs are interleaved (ft-s0, lora-s0, dora-s0,
    ft-s1, ...) and wrapped after one of each method, so every row reads like the paper.
    """
    order = plotting.run_order(layers)
    method_of = dict(zip(layers["run"], layers["method"]))
    by_method: dict[str, list[str]] = {}
    for run in order:
        by_method.setdefault(str(method_of[run]), []).append(run)
    counts = {len(v) for v in by_method.values()}
    if len(by_method) > 1 and len(order) > len(by_method) and len(counts) == 1:
        interleaved = [run for group in zip(*by_method.values()) for run in group]
        return interleaved, len(by_method)
    return order, (4 if len(order) > 4 else None)


def _figure2_caption(layers: pd.DataFrame, kind: str, runs: Sequence[str], *, first: bool = True) -> str:
    """The figure-2 caption, with what is plotted counted from the rows (layers, checkpoints,
    runs) and the paper's own setting named apart, so a reader can compare the two. After the
    first kind's figure, only the counts: the rest would repeat, once per kind."""
    part = layers[layers["kind"].astype(str) == kind]
    per_run = part.groupby("run").agg(layers=("layer", "nunique"), matrices=("module", "nunique"), steps=("step", "nunique"))

    def count(column: str, word: str, plural: str) -> str:
        """``"4 layers"``, or ``"2 to 4 layers"`` when the runs differ."""
        lo, hi = int(per_run[column].min()), int(per_run[column].max())
        return _plural(hi, word, plural) if lo == hi else f"{lo} to {hi} {plural}"

    # "4 layers" only when each layer holds one such matrix (not an encoder and a decoder).
    one_per_layer = (per_run["layers"] == per_run["matrices"]).all()
    where = f"of {count('layers', 'layer', 'layers')}" if one_per_layer else f"({count('matrices', 'matrix', 'matrices')})"
    at = count("steps", "checkpoint", "checkpoints")
    drawn = set(map(str, part["run"]))
    missing = [r for r in runs if str(r) not in drawn]
    lacking = f" (none in {', '.join(f'`{r}`' for r in missing)}: an empty panel)" if missing else ""
    if not first:
        return f"As above, for the `{kind}` matrices {where} at {at}, in {_plural(len(drawn), 'run')}{lacking}."
    return (
        f"ΔM against ΔD for the `{kind}` matrices {where} at {at}, in {_plural(len(drawn), 'run')}{lacking}: "
        "one point per matrix and checkpoint (the number is the layer, the colour the training step), with the "
        "OLS line and its 95% confidence band. Each panel has its own scale, as in the paper's figure 2, which "
        f"plots the {PAPER_SETTING}."
    )


def _draw_figures(layers: pd.DataFrame, out_dir: Path, fmt: str) -> list[FigureBlock]:
    """Draw every figure into ``out_dir/figures/`` and return them as report blocks."""
    (out_dir / "figures").mkdir(exist_ok=True)
    mime = "image/svg+xml" if fmt == "svg" else "image/png"
    drawn: list[FigureBlock] = []
    kinds = plotting.kind_order(layers)
    runs, wrap = _figure2_layout(layers)

    def save(grid: sns.FacetGrid, name: str, title: str, caption: str) -> None:
        try:
            rel = f"figures/{name}.{fmt}"
            data = _save(grid.figure, out_dir / rel, fmt)
            drawn.append(FigureBlock(rel, title, caption, mime, data, _css_width(data, mime)))
        finally:
            plt.close(grid.figure)  # figures are saved, never shown: free them at once

    for i, kind in enumerate(kinds):
        g = plotting.plot_md_grid(layers, runs=runs, kinds=[kind], col_wrap=wrap)
        caption = _figure2_caption(layers, kind, runs, first=i == 0)
        save(g, f"figure2_{_slug(kind)}", f"ΔM against ΔD: `{kind}` (the paper's figure 2 layout)", caption)
    steps = layers.groupby("run")["step"].nunique()
    if steps.max() > 1 and layers["layer"].notna().any():
        caption = "ΔM (left) and ΔD (right) of every matrix at each checkpoint, {rows}; colour is the layer."
        if len(kinds) == 1:
            g = plotting.plot_trajectories(layers, runs=plotting.run_order(layers))
            save(g, "trajectories", "ΔM and ΔD across training", caption.format(rows="a row per run"))
        else:
            # Line styles cannot tell seven kinds apart, and every run's kinds in one grid would
            # be shrunk past reading: a figure per run, a row per kind.
            for run in plotting.run_order(layers):
                if steps[run] < 2:
                    continue
                g = plotting.plot_trajectories(layers, runs=[run], row="kind", height=2.0, aspect=1.6)
                label = plotting.run_label(run, layers.loc[layers["run"] == run, "method"].iloc[0])
                save(g, f"trajectories_{_slug(run)}", f"ΔM and ΔD across training: {label}", caption.format(rows="a row per matrix kind"))
    if layers["layer"].notna().any():
        single = len(kinds) == 1
        for value, name in (("delta_d", "ΔD"), ("delta_m", "ΔM")):
            g = plotting.plot_heatmap_grid(layers, value=value, runs=runs if single else None, col_wrap=wrap if single else None)
            save(
                g,
                f"heatmap_{value}",
                f"{name} by layer and step",
                f"{name} of each layer (rows) at each checkpoint (columns), per run and kind.",
            )
    return drawn


def _draw_spectral_figures(layers: pd.DataFrame, out_dir: Path, fmt: str) -> list[FigureBlock]:
    """The spectral metrics' figures, for the columns present: intruders per layer and run,
    the update's singular values per run (``spectra.csv``), stable rank across steps, and the
    subspace-similarity heatmap of ``pairs.csv``."""
    from .analysis import subspace_pairs, update_spectra

    (out_dir / "figures").mkdir(exist_ok=True)
    mime = "image/svg+xml" if fmt == "svg" else "image/png"
    drawn: list[FigureBlock] = []

    def save(ax: plt.Axes, name: str, title: str, caption: str) -> None:
        try:
            rel = f"figures/{name}.{fmt}"
            ax.figure.tight_layout()
            data = _save(ax.figure, out_dir / rel, fmt)  # type: ignore[arg-type]
            drawn.append(FigureBlock(rel, title, caption, mime, data, _css_width(data, mime)))
        finally:
            plt.close(ax.figure)  # type: ignore[arg-type]

    has_layers = layers["layer"].notna().any()
    if "intruders" in layers.columns and has_layers:
        k = int(layers["intruder_k"].max()) if "intruder_k" in layers.columns else None
        save(
            plotting.plot_intruders(layers),
            "intruders",
            "Intruder dimensions per layer",
            f"Mean number of intruder dimensions per matrix of each layer at each run's last step (top {k} singular vectors of W_t), one bar per run.",
        )
    spectra = update_spectra(layers)
    if len(spectra):
        save(
            plotting.plot_update_spectra(spectra),
            "update_spectra",
            "Singular values of the update",
            "σᵢ / σ₁ of each run's update dW = W_t − W0 at its last checkpoint, the median over matrices, on a log scale: "
            "a LoRA update has at most r non-zero singular values, a full fine-tune's spread over many more. "
            "Every matrix's top singular values are in spectra.csv.",
        )
    if "dw_stable_rank" in layers.columns and layers.groupby("run")["step"].nunique().max() > 1:
        save(
            plotting.plot_stable_rank(layers),
            "stable_rank",
            "Stable rank of the update across training",
            "Stable rank ||dW||²_F / σ₁² of each run's update at each checkpoint: the mean over matrices, with its 95% interval.",
        )
    pairs = subspace_pairs(layers)
    if len(pairs):
        last = pairs.groupby(["run_a", "run_b"], sort=False)["step_b"].transform("max")
        chosen = pairs[(pairs["step_a"] == last) & (pairs["step_b"] == last)]
        scope = "the two runs' last checkpoints" if len(chosen) else "every pair of checkpoints"
        chosen = chosen if len(chosen) else pairs
        save(
            plotting.plot_subspace_similarity(chosen),
            "subspace_similarity",
            "Subspace similarity of the updates",
            f"φ(i, j) = ||U_aᵀ[:i] U_b[:j]||²_F / min(i, j) between the top singular directions of two updates of the same matrix "
            f"(Hu et al. 2021, LoRA, figure 3), averaged over matrices and over {scope}; 1 means the same subspace, 0 orthogonal ones. "
            "Every pair is in pairs.csv.",
        )
    return drawn


# --------------------------------------------------------------------------------------------
# The report's text
# --------------------------------------------------------------------------------------------


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _overview(layers: pd.DataFrame) -> str:
    runs = plotting.run_order(layers)
    method_of = dict(zip(layers["run"], layers["method"]))
    names = ", ".join(f"`{r}` ({method_label(method_of[r])})" for r in runs)
    kinds = ", ".join(f"`{k}`" for k in plotting.kind_order(layers))
    steps = layers.groupby("run")["step"].nunique()
    step_text = f"{steps.min()}" if steps.min() == steps.max() else f"{steps.min()} to {steps.max()}"
    axes = set(layers["axis"]) if "axis" in layers else {"out"}
    vectors = (
        "rows of each `[out, in]` weight (one per output feature, as in the paper)"
        if axes == {"out"}
        else "columns of each weight (`--axis in`, not the paper's convention)"
    )
    return (
        f"{_plural(len(runs), 'run')}: {names}. {_plural(layers['module'].nunique(), 'matrix', 'matrices')} "
        f"of kind {kinds}, {step_text} checkpoint{'' if steps.max() == 1 else 's'} per run, "
        f"{_plural(len(layers), '(matrix, checkpoint) point')}. "
        f"Norms and cosines are taken over the {vectors}."
    )


_WITHIN_BETWEEN_TEXT = (
    "Reading the parts: the pooled r mixes the same matrix moving across checkpoints (within: ΔM and ΔD "
    "both grow with training, so this part tends to be positive for every method) with differences between "
    "matrices (between: the correlation of their means over checkpoints). When the two disagree in sign, the "
    "pooled r depends on how many checkpoints are pooled and where they sit in training. The 95% interval "
    "resamples whole matrices (a cluster bootstrap), because the checkpoints of one matrix are not independent."
)

_GROWTH_TEXT = (
    "ΔM is an absolute change, so it does not say whether fine-tuning lengthens the vectors or "
    "shortens them; the signed change does. AdamW's weight decay, for one, shortens them in proportion "
    "to their norm: matrices with large norms then lose much magnitude while turning little, which "
    "pushes the correlation negative."
)


def _finding(row: Mapping[str, object], paper: Mapping[str, float] | None) -> str:
    """One bullet: a run and kind, its r in words, slope, within/between parts, the paper's r."""
    kind = "all kinds pooled" if row["kind"] == "all" else f"`{row['kind']}`"
    reading = describe_correlation(_get(row, "pearson_r"), ci_low=_get(row, "r_ci_low"), ci_high=_get(row, "r_ci_high"), n=int(row["n"]))
    details = [f"Slope {_num(row.get('slope'), '.3g')}"]
    if math.isfinite(_get(row, "r_between")) or math.isfinite(_get(row, "r_within")):
        details.append(f"between matrices r = {_r(_get(row, 'r_between'))}, within r = {_r(_get(row, 'r_within'))}")
    ref = _paper_value(paper, row)
    if ref is not None:
        details.append(f"paper {_r(ref)}")
    label = plotting.run_label(str(row["run"]), str(row["method"]))
    return f"{label}, {kind}: {reading}. " + "; ".join(details) + "."


def _paper_value(paper: Mapping[str, float] | None, row: Mapping[str, object]) -> float | None:
    """The paper's r for a summary row's run (by run name, else by method), if given."""
    if not paper:
        return None
    for key in (str(row["run"]), str(row["method"]).lower()):
        if key in paper:
            return float(paper[key])
    return None


def _paper_row(rows: pd.DataFrame) -> pd.Series:
    """The summary row of a run that matches the paper's figure 2: its query matrices, else all."""
    for kind in rows["kind"]:
        if is_paper_kind(kind):
            return rows[rows["kind"] == kind].iloc[0]
    return rows[rows["kind"] == "all"].iloc[0] if (rows["kind"] == "all").any() else rows.iloc[0]


def _paper_table(summary: pd.DataFrame, paper: Mapping[str, float]) -> Table:
    rows = []
    for run, part in summary.groupby("run", sort=False):
        row = _paper_row(part)
        ref = _paper_value(paper, row)
        if ref is None:
            continue
        r = _get(row, "pearson_r")
        agrees = "n/a" if not math.isfinite(r) else ("yes" if has_sign(r, 1 if ref > 0 else -1) else "no")
        rows.append((str(run), method_label(str(row["method"])), str(row["kind"]), _r(r), _r(ref), agrees))
    return Table(("run", "method", "kind", "measured r", "paper r (fig. 2)", "same sign"), tuple(rows))


def _summary_table(summary: pd.DataFrame, metric: Metric) -> Table:
    """A metric's summary columns for every summary row, headers and formats from its column specs.

    Only the columns the summary has are shown (a summary written by an older version may lack
    some); a metric that reads its rows in words adds a ``reading`` column.
    """
    columns = [c for c in metric.summary_columns if c.name in summary.columns]
    reading = getattr(metric, "reading", None)
    header = ("run", "method", "kind", *(c.header for c in columns), *(("reading",) if reading else ()))
    rows = []
    for row in summary.to_dict("records"):
        cells = [str(row["run"]), method_label(str(row["method"])), str(row["kind"])]
        cells += [c.display(row.get(c.name)) for c in columns]
        if reading is not None:
            cells.append(reading(row))
        rows.append(tuple(cells))
    return Table(header, tuple(rows))


def _last_step_table(layers: pd.DataFrame, metric: Metric) -> Table:
    """A metric's headline columns at each run's last step, averaged over the matrices of a kind."""
    by_name = {c.name: c for c in metric.columns}
    columns = [by_name[n] for n in metric.headline if n in layers.columns]
    last = layers[layers["step"] == layers.groupby("run")["step"].transform("max")]
    means = in_block_order(last.groupby(["run", "method", "kind"], sort=False)[[c.name for c in columns]].mean().reset_index())
    header = ("run", "method", "kind", "step", *(f"mean {c.header}" for c in columns))
    steps = last.groupby("run")["step"].max()
    rows = tuple(
        (str(r["run"]), method_label(str(r["method"])), str(r["kind"]), str(steps[r["run"]]), *(c.display(r[c.name]) for c in columns))
        for r in means.to_dict("records")
    )
    return Table(header, rows)


def _metric_section(layers: pd.DataFrame, summary: pd.DataFrame, metric: Metric) -> list[Block]:
    """A metric's own section: its title, its plain-language description, its numbers."""
    blocks: list[Block] = [Heading(metric.title), Paragraph(metric.description)]
    if any(c.name in summary.columns for c in metric.summary_columns):
        blocks.append(_summary_table(summary, metric))
    if any(n in layers.columns for n in metric.headline):
        blocks.append(_last_step_table(layers, metric))
    return blocks


def _growth_table(layers: pd.DataFrame) -> Table | None:
    """Signed magnitude change per run and kind: do the vectors grow or shrink?"""
    if not {"delta_m_signed", "base_norm"} <= set(layers.columns):
        return None
    rows = []
    for row in magnitude_direction(layers).to_dict("records"):
        share = _get(row, "shrink_share")
        verdict = "shrink" if share == 1 else "grow" if share == 0 else f"shrink in {share:.0%} of points"
        rows.append((
            str(row["run"]), method_label(str(row["method"])), str(row["kind"]),
            _num(row["delta_m_signed"], "+.3g"), _num(100 * _get(row, "relative"), "+.3g") + "%", verdict,
        ))  # fmt: skip
    return Table(("run", "method", "kind", "mean m_t - m_0", "relative to base norm", "vectors"), tuple(rows))


def _findings(summary: pd.DataFrame, paper: Mapping[str, float] | None) -> Bullets:
    """A bullet per run and kind; the pooled row only where a run has several kinds."""
    items = []
    for _, part in summary.groupby("run", sort=False):
        kinds = part[part["kind"] != "all"]
        chosen = part if len(kinds) > 1 else (kinds if len(kinds) else part)
        items += [_finding(row, paper) for row in chosen.to_dict("records")]
    return Bullets(tuple(items))


def _blocks(
    layers: pd.DataFrame,
    summary: pd.DataFrame,
    figures: Sequence[FigureBlock],
    out_dir: Path,
    paper: Mapping[str, float] | None,
) -> list[Block]:
    metrics = metrics_of(layers.columns)
    md = next((m for m in metrics if isinstance(m, MagnitudeDirection)), None)
    blocks: list[Block] = [Paragraph(f"Written by dora-analysis {__version__}.")]
    blocks += [Paragraph(md.description)] if md is not None else []
    if layers.empty or summary.empty:
        return blocks + [Paragraph("No matrices were compared: there is nothing to report.")]
    # Order the runs as the figures do: FT, LoRA, DoRA, others.
    rank = {run: i for i, run in enumerate(plotting.run_order(summary))}
    summary = summary.sort_values("run", key=lambda s: s.map(rank), kind="stable")
    blocks.append(Paragraph(_overview(layers)))
    if md is not None:
        blocks += _md_sections(layers, summary, md, paper)
    for metric in metrics:
        if metric is not md:
            blocks += _metric_section(layers, summary, metric)
    if figures:
        blocks += [Heading("Figures"), *figures]
    present = tuple((name, what) for name, what in DATA_FILES.items() if (out_dir / name).is_file())
    if present:
        blocks += [Heading("Data"), FileLinks(present)]
    return blocks


def _md_sections(layers: pd.DataFrame, summary: pd.DataFrame, md: MagnitudeDirection, paper: Mapping[str, float] | None) -> list[Block]:
    """The magnitude / direction findings: r in words, the paper beside it, growth, the summary."""
    blocks: list[Block] = [Heading("Findings"), _findings(summary, paper)]
    if {"r_within", "r_between"} <= set(summary.columns):
        blocks.append(Paragraph(_WITHIN_BETWEEN_TEXT))
    if paper:
        table = _paper_table(summary, paper)
        if table.rows:
            blocks += [
                Heading("Compared with the paper"),
                Paragraph(
                    f"The paper's figure 2 reports Pearson r over the {PAPER_SETTING}; the measured r is for the kind named, pooled over layers and checkpoints."
                ),
                table,
            ]
    growth = _growth_table(layers)
    if growth is not None and growth.rows:
        blocks += [Heading("Do the vectors grow or shrink?"), Paragraph(_GROWTH_TEXT), growth]
    return blocks + [Heading("Summary"), _summary_table(summary, md)]


def write_report(
    out_dir: Path,
    layers: pd.DataFrame,
    summary: pd.DataFrame,
    *,
    fmt: str = "png",
    plots: bool = True,
    title: str | None = None,
    paper: Mapping[str, float] | None = None,
) -> list[Path]:
    """Write ``figures/*.{fmt}``, ``report.md`` and a self-contained ``report.html`` into ``out_dir``.

    The Markdown links figures relatively (``figures/figure2_query.png``), so it renders on
    GitHub and in any Markdown viewer; the HTML embeds them (PNG, or SVG when ``fmt="svg"``)
    and needs no other file. Both link only files that exist: the figures written here, and
    ``layers.csv`` / ``summary.csv`` / ``summary.json`` if already in ``out_dir``. Figures are
    drawn off-screen (interactive mode off) and closed once saved; nothing is shown.

    Args:
        out_dir: Folder to write into (created if missing).
        layers: The analyzer's per-matrix DataFrame (:func:`dora_analysis.analyze`).
        summary: Its summary (:func:`dora_analysis.summarize`).
        fmt: Figure format: ``png``, ``svg`` or ``pdf``.
        plots: Draw figures; False writes the text only, with no figure links.
        title: The report's title.
        paper: Reference correlations by method or run name (e.g. :data:`dora_analysis.paper.PAPER_R`), shown
            beside the measured r of each run's query matrices.

    Returns:
        The written files: figures first, then ``report.md`` and ``report.html``.

    Raises:
        ValueError: Unknown ``fmt``.

    Example:
        >>> write_report(Path("out"), layers, summary, fmt="svg", paper=PAPER_R)
        [PosixPath('out/figures/figure2_query.svg'), ..., PosixPath('out/report.html')]
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown figure format {fmt!r}: use one of {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = title or "Magnitude and direction of fine-tuning updates (ΔM vs ΔD)"

    figures: list[FigureBlock] = []
    # The figures plot dM against dD: the md metric's columns.
    if plots and not layers.empty and {"delta_d", "delta_m"} <= set(layers.columns):
        with plt.ioff():  # never pop up a window, whatever the backend
            figures = _draw_figures(layers, out_dir, fmt)
    if plots and not layers.empty:
        with plt.ioff():
            figures += _draw_spectral_figures(layers, out_dir, fmt)

    blocks = _blocks(layers, summary, figures, out_dir, paper)
    md, page = out_dir / "report.md", out_dir / "report.html"
    md.write_text(render_markdown(title, blocks), encoding="utf-8")
    page.write_text(render_html(title, blocks), encoding="utf-8")
    return [out_dir / f.path for f in figures] + [md, page]
