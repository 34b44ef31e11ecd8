"""The report: figures written in every format, links only to files that exist, HTML that
needs nothing else, and correlations read out in words."""

from __future__ import annotations

import math
import re
from html.parser import HTMLParser
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from dora_analysis import summarize
from dora_analysis.paper import PAPER_R
from dora_analysis.report import describe_correlation, write_report

from .test_plots import make_layers

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "svg": b"<?xml", "pdf": b"%PDF-"}


@pytest.fixture(scope="module")
def tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Small FT / LoRA / DoRA runs (one kind, 3 layers, 3 steps) and their summary."""
    layers = make_layers(layers=3, kinds=("query",))
    return layers, summarize(layers, n_boot=100)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def md_links(text: str) -> list[str]:
    """Targets of Markdown links and images: ``[..](target)``."""
    return re.findall(r"\]\(([^)\s]+)\)", text)


class _Refs(HTMLParser):
    """Every src/href in an HTML page, and every tag that would load a resource."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.refs += [v or "" for k, v in attrs if k in ("src", "href")]


@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
def test_every_format_written_nonempty_and_linked(tmp_path: Path, tables: tuple, fmt: str) -> None:
    layers, summary = tables
    written = write_report(tmp_path, layers, summary, fmt=fmt)
    figures = [p for p in written if p.parent.name == "figures"]
    assert {p.name for p in figures} == {f"figure2_query.{fmt}", f"trajectories.{fmt}", f"heatmap_delta_d.{fmt}", f"heatmap_delta_m.{fmt}"}
    for path in figures:
        assert path.stat().st_size > 1000 and path.read_bytes().startswith(MAGIC[fmt])
    assert written[-2:] == [tmp_path / "report.md", tmp_path / "report.html"]
    assert sorted(tmp_path.rglob("*.*")) == sorted(written)  # nothing written that is not returned

    md = (tmp_path / "report.md").read_text()
    links = md_links(md)
    assert sorted(links) == sorted(p.relative_to(tmp_path).as_posix() for p in figures)
    assert all((tmp_path / link).is_file() for link in links)

    page = _Refs()
    page.feed((tmp_path / "report.html").read_text())
    assert page.refs and all(ref.startswith("data:image/") for ref in page.refs)
    assert page.tags.count("img") == len(figures)
    assert not {"script", "link", "iframe", "object"} & set(page.tags)


def test_links_only_existing_data_files(tmp_path: Path, tables: tuple) -> None:
    layers, summary = tables
    layers.to_csv(tmp_path / "layers.csv", index=False)  # as the CLI does before the report
    write_report(tmp_path, layers, summary, plots=False)
    md = (tmp_path / "report.md").read_text()
    assert md_links(md) == ["layers.csv"]
    assert "summary.csv" not in md


def test_no_plots_means_no_figures_and_no_links(tmp_path: Path, tables: tuple) -> None:
    layers, summary = tables
    written = write_report(tmp_path, layers, summary, plots=False)
    assert written == [tmp_path / "report.md", tmp_path / "report.html"]
    assert not (tmp_path / "figures").exists()
    md = (tmp_path / "report.md").read_text()
    assert md_links(md) == [] and "figures/" not in md
    assert "<img" not in (tmp_path / "report.html").read_text()


def test_summary_findings_and_paper_side_by_side(tmp_path: Path, tables: tuple) -> None:
    layers, summary = tables
    write_report(tmp_path, layers, summary, plots=False, paper=PAPER_R, title="Seed 0")
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# Seed 0\n")
    # The paper table: one row per run, measured next to the paper's r, in figure 2's order.
    rows = re.findall(r"^\| (\w+) \| (\w+) \| query \| ([+-]\d\.\d\d) \| ([+-]\d\.\d\d) \| (yes|no) \|$", md, re.M)
    assert [(run, paper) for run, _, _, paper, _ in rows] == [("ft", "-0.62"), ("lora", "+0.83"), ("dora", "-0.31")]
    for run, _, measured, _, same in rows:
        r = summary.query("run == @run and kind == 'query'")["pearson_r"].item()
        assert measured == f"{r:+.2f}" and same == ("yes" if (r > 0) == (PAPER_R[run] > 0) else "no")
    # The summary table has every summary row; findings read r in words.
    assert len(re.findall(r"^\| (ft|lora|dora) \| (FT|LoRA|DoRA) \| (query|all) \| \d+ \|", md, re.M)) == len(summary)
    lora = summary.query("run == 'lora' and kind == 'query'")["pearson_r"].item()
    assert f"LoRA, `query`: strong positive (r = {lora:+.2f}" in md
    html = (tmp_path / "report.html").read_text()
    assert "<code>query</code>" in html and "paper r (fig. 2)" in html


def test_report_without_the_newer_summary_columns(tmp_path: Path, tables: tuple) -> None:
    layers, summary = tables
    old = summary.drop(columns=["r_within", "r_between", "r_ci_low", "r_ci_high"])
    write_report(tmp_path, layers, old, plots=False)
    md = (tmp_path / "report.md").read_text()
    assert "r within" not in md and "95% CI" not in md and "strong" in md


def test_empty_analysis_still_writes_a_report(tmp_path: Path, tables: tuple) -> None:
    layers, summary = tables
    written = write_report(tmp_path, layers.iloc[:0], summary.iloc[:0])
    assert [p.name for p in written] == ["report.md", "report.html"]
    assert "nothing to report" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
def test_figures_are_reproducible_byte_for_byte(tmp_path: Path, fmt: str) -> None:
    """Committed reference figures should not change when nothing changed (no dates, fixed ids)."""
    layers = make_layers({"ft": (0.02, 0.07, -1)}, layers=3, kinds=("query",))
    summary = summarize(layers, n_boot=0)
    one = write_report(tmp_path / "a", layers, summary, fmt=fmt)
    two = write_report(tmp_path / "b", layers, summary, fmt=fmt)
    assert [p.read_bytes() for p in one] == [p.read_bytes() for p in two]


def test_unknown_format(tmp_path: Path, tables: tuple) -> None:
    with pytest.raises(ValueError, match="use one of png, svg, pdf"):
        write_report(tmp_path, *tables, fmt="jpg")


@pytest.mark.parametrize(
    ("r", "ci", "expected"),
    [
        (-0.62, (math.nan, math.nan), "strong negative (r = -0.62)"),
        (0.83, (0.7, 0.9), "strong positive (r = +0.83, 95% CI [+0.70, +0.90])"),
        (
            -0.31,
            (-0.6, 0.1),
            "moderate negative (r = -0.31, 95% CI [-0.60, +0.10]); the interval includes 0, so the sign is not established",
        ),
        (0.05, (math.nan, math.nan), "no correlation (r = +0.05)"),
        (math.nan, (math.nan, math.nan), "undefined (fewer than 3 distinct points)"),
    ],
)
def test_describe_correlation(r: float, ci: tuple[float, float], expected: str) -> None:
    assert describe_correlation(r, ci_low=ci[0], ci_high=ci[1]) == expected


def test_report_says_whether_vectors_grow_or_shrink(tmp_path: Path) -> None:
    layers = make_layers(kinds=("query",))
    # FT rows shrink everywhere, LoRA rows grow everywhere, DoRA: one layer of four shrinks.
    layers["delta_m_signed"] = 0.01
    layers.loc[layers["method"] == "ft", "delta_m_signed"] = -0.02
    layers.loc[(layers["method"] == "dora") & (layers["layer"] == 0), "delta_m_signed"] = -0.01
    layers["base_norm"] = 2.0
    write_report(tmp_path, layers, summarize(layers, n_boot=0), plots=False)
    text = (tmp_path / "report.md").read_text()
    section = text.split("## Do the vectors grow or shrink?")[1].split("## ")[0]
    rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ") and "run" not in line}
    assert rows["ft"].rstrip(" |").endswith("shrink") and "-0.02" in rows["ft"] and "-1%" in rows["ft"]
    assert rows["lora"].rstrip(" |").endswith("grow") and "+0.5%" in rows["lora"]
    assert "shrink in 25% of points" in rows["dora"]


def test_figure2_caption_counts_what_is_plotted_and_names_the_paper_apart(tmp_path: Path) -> None:
    """4 layers at 3 checkpoints are described as such, not as the paper's 6 layers at 4."""
    from dora_analysis.paper import PAPER_SETTING

    layers = make_layers(layers=4, steps=(10, 20, 30), kinds=("query",))
    layers.to_csv(tmp_path / "layers.csv", index=False)
    write_report(tmp_path, layers, summarize(layers, n_boot=0))
    md = (tmp_path / "report.md").read_text()
    caption = next(line for line in md.splitlines() if line.startswith("*ΔM against ΔD for the `query`"))
    assert "`query` matrices of 4 layers at 3 checkpoints, in 3 runs:" in caption
    assert caption.rstrip("*").endswith(f"the paper's figure 2, which plots the {PAPER_SETTING}.")
    html = (tmp_path / "report.html").read_text()
    assert "of 4 layers at 3 checkpoints, in 3 runs" in html
    # Every PNG is shown at its size in inches, so text reads at one size across figures.
    widths = [int(w) for w in re.findall(r'<img src="data:image/png[^"]*" width="(\d+)"', html)]
    assert len(widths) == html.count("<img") and all(100 < w < 2000 for w in widths)


def test_figure2_caption_names_a_run_without_the_kind() -> None:
    from dora_analysis.report import _figure2_caption

    layers = make_layers(layers=3, steps=(10, 20), kinds=("query", "value"))
    layers = layers[~((layers["run"] == "lora") & (layers["kind"] == "value"))]
    layers = layers[~((layers["run"] == "dora") & (layers["step"] == 20))]
    caption = _figure2_caption(layers, "value", ["ft", "lora", "dora"])
    assert "`value` matrices of 3 layers at 1 to 2 checkpoints, in 2 runs (none in `lora`: an empty panel)" in caption


def test_figure2_caption_explains_once_then_counts(tmp_path: Path) -> None:
    """With several kinds, the first figure's caption says what is drawn; the others give their counts only."""
    layers = make_layers(layers=3, steps=(10, 20), kinds=("query", "value"))
    layers.to_csv(tmp_path / "layers.csv", index=False)
    write_report(tmp_path, layers, summarize(layers, n_boot=0))
    captions = [line for line in (tmp_path / "report.md").read_text().splitlines() if "matrices of 3 layers" in line]
    assert len(captions) == 2
    assert captions[0].startswith("*ΔM against ΔD for the `query` matrices of 3 layers at 2 checkpoints, in 3 runs:")
    assert "OLS line" in captions[0] and "paper's figure 2" in captions[0]
    assert captions[1] == "*As above, for the `value` matrices of 3 layers at 2 checkpoints, in 3 runs.*"


def test_html_links_the_data_files_beside_it(tmp_path: Path, tables: tuple) -> None:
    """The HTML is written beside layers.csv, so it links it, as the Markdown does."""
    layers, summary = tables
    layers.to_csv(tmp_path / "layers.csv", index=False)
    write_report(tmp_path, layers, summary, plots=False)
    html = (tmp_path / "report.html").read_text()
    assert '<a href="layers.csv">' in html and "summary.csv" not in html
    page = _Refs()
    page.feed(html)
    assert page.refs == ["layers.csv"] and (tmp_path / page.refs[0]).is_file()


def test_trajectories_with_several_kinds_get_a_figure_per_run(tmp_path: Path) -> None:
    """Line styles cannot tell kinds apart: a figure per run, a row of panels per kind."""
    layers = make_layers({"ft": (0.02, 0.07, -1), "lora": (0.13, 0.35, 1)}, layers=2, steps=(10, 20), kinds=("query", "value"))
    written = write_report(tmp_path, layers, summarize(layers, n_boot=0))
    names = {p.name for p in written if p.parent.name == "figures"}
    assert {"trajectories_ft.png", "trajectories_lora.png"} <= names and "trajectories.png" not in names
    md = (tmp_path / "report.md").read_text()
    assert "### ΔM and ΔD across training: LoRA" in md and "a row per matrix kind" in md
