"""Figures, checked on the drawn artists: points, labels, fitted lines, layer numbers, panels.

Synthetic DataFrames in the analyzer's layout stand in for real runs: what is tested is the
drawing, and the numbers it shows against :mod:`dora_analysis.stats` / ``summarize``.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection, QuadMesh
from matplotlib.colors import to_hex

from dora_analysis import plots, stats, summarize

METHODS = {"ft": (0.018, 0.07, -1), "lora": (0.13, 0.35, +1), "dora": (0.24, 1.0, -1)}


def make_layers(
    methods: dict[str, tuple[float, float, int]] = METHODS,
    *,
    layers: int = 4,
    steps: tuple[int, ...] = (100, 200, 300),
    kinds: tuple[str, ...] = ("query", "value"),
    seed: int = 0,
) -> pd.DataFrame:
    """Analyzer-shaped rows where dM follows dD with each method's sign, plus noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for method, (d0, m0, sign) in methods.items():
        for kind in kinds:
            for layer in range(layers):
                u = rng.normal()
                for i, step in enumerate(steps):
                    grow = 1 + 0.1 * i
                    rows.append(
                        {
                            "run": method, "method": method, "step": step,
                            "module": f"encoder.layer.{layer}.attention.self.{kind}", "layer": layer, "kind": kind,
                            "rows": 8, "cols": 8,
                            "delta_d": d0 * (1 + 0.2 * u) * grow + rng.normal(0, d0 * 0.02),
                            "delta_m": m0 * (1 + sign * 0.25 * u) * grow + rng.normal(0, m0 * 0.02),
                            "delta_m_signed": -m0, "base_norm": 1.0, "zero_rows": 0, "axis": "out",
                        }
                    )  # fmt: skip
    df = pd.DataFrame(rows)
    df["layer"] = df["layer"].astype("Int64")  # as the analyzer returns it
    return df


@pytest.fixture
def layers() -> pd.DataFrame:
    return make_layers()


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def n_points(ax: plt.Axes) -> int:
    """Scatter points on an Axes: offsets of its PathCollections (the fit band is a PolyCollection)."""
    return sum(len(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection))


def fit_lines(ax: plt.Axes) -> list[matplotlib.lines.Line2D]:
    return [line for line in ax.lines if len(line.get_xdata()) > 1]


# --- plot_md ----------------------------------------------------------------------------------


def test_plot_md_one_point_per_row_with_labels(layers: pd.DataFrame) -> None:
    part = layers.query("run == 'lora' and kind == 'query'")
    ax = plots.plot_md(layers, run="lora", kind="query")
    assert n_points(ax) == len(part)
    offsets = np.concatenate([c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)])
    np.testing.assert_allclose(np.sort(offsets[:, 0]), np.sort(part["delta_d"]))
    np.testing.assert_allclose(np.sort(offsets[:, 1]), np.sort(part["delta_m"]))
    assert "ΔD" in ax.get_xlabel() and "direction" in ax.get_xlabel()
    assert "ΔM" in ax.get_ylabel() and "magnitude" in ax.get_ylabel()
    # Every point carries its layer number, placed at that point.
    texts = sorted((t.get_text(), t.xy) for t in ax.texts)
    expected = sorted((str(r.layer), (r.delta_d, r.delta_m)) for r in part.itertuples())
    assert [t for t, _ in texts] == [t for t, _ in expected]
    np.testing.assert_allclose([xy for _, xy in texts], [xy for _, xy in expected])


def test_plot_md_regression_line_matches_stats(layers: pd.DataFrame) -> None:
    part = layers.query("run == 'ft' and kind == 'query'")
    ax = plots.plot_md(part)
    (line,) = fit_lines(ax)
    x, y = line.get_xdata(), line.get_ydata()
    slope, intercept = stats.ols(part["delta_d"], part["delta_m"])
    np.testing.assert_allclose(y, slope * x + intercept)
    assert x.min() == pytest.approx(part["delta_d"].min()) and x.max() == pytest.approx(part["delta_d"].max())
    r = summarize(part, n_boot=0).query("kind == 'query'")["pearson_r"].item()
    assert f"r = {r:+.2f}" in ax.get_title() and f"slope = {slope:.3g}" in ax.get_title()
    assert ax.get_title().startswith("FT · query")
    assert any("OLS" in t.get_text() for t in ax.get_legend().get_texts())


def test_plot_md_band_contains_line(layers: pd.DataFrame) -> None:
    ax = plots.plot_md(layers, run="dora", kind="value")
    (band,) = [c for c in ax.collections if not isinstance(c, PathCollection)]
    (line,) = fit_lines(ax)
    verts = band.get_paths()[0].vertices
    for x, y in zip(line.get_xdata()[1:-1:10], line.get_ydata()[1:-1:10]):
        near = verts[np.isclose(verts[:, 0], x)]
        assert near[:, 1].min() < y < near[:, 1].max()
    ax = plots.plot_md(layers, run="dora", kind="value", ci=None, ax=plt.figure().gca())
    assert [c for c in ax.collections if not isinstance(c, PathCollection)] == []


def test_mean_band_closed_form() -> None:
    """At the mean of x the band's half-width is t(n-2) * s / sqrt(n)."""
    from scipy import stats as sps

    x = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    y = np.array([0.1, 0.9, 2.2, 2.8, 4.1])
    slope, intercept = stats.ols(x, y)
    s = math.sqrt(((y - slope * x - intercept) ** 2).sum() / 3)
    lo, hi = stats.ols_band(x, y, np.array([2.0]), level=0.95)
    assert (hi - lo)[0] / 2 == pytest.approx(sps.t.ppf(0.975, 3) * s / math.sqrt(5))


def test_plot_md_hue_is_ordered_by_step(layers: pd.DataFrame) -> None:
    part = layers.query("run == 'lora' and kind == 'query'")
    ax = plots.plot_md(part)
    (points,) = [c for c in ax.collections if isinstance(c, PathCollection)]
    colours = [to_hex(c) for c in points.get_facecolors()]
    palette = plots.ordered_palette([100, 200, 300], plots.STEP_PALETTE)
    assert colours == [palette[s] for s in part["step"]]
    assert len(set(palette.values())) == 3
    assert [t.get_text() for t in ax.get_legend().get_texts()][:3] == ["100", "200", "300"]


def test_legend_thins_many_steps() -> None:
    df = make_layers({"ft": METHODS["ft"]}, steps=tuple(range(10, 210, 10)), kinds=("query",))
    ax = plots.plot_md(df)
    labels = [t.get_text() for t in ax.get_legend().get_texts() if "OLS" not in t.get_text()]
    assert len(labels) == plots.MAX_LEGEND_ENTRIES and labels[0] == "10" and labels[-1] == "200"
    assert n_points(ax) == len(df)


def test_plot_md_drops_non_finite_and_skips_fit_below_three_points(layers: pd.DataFrame) -> None:
    part = layers.query("run == 'ft' and kind == 'query'").copy()
    part.loc[part.index[0], "delta_d"] = np.nan
    ax = plots.plot_md(part)
    assert n_points(ax) == len(part) - 1
    few = part.iloc[1:3]
    ax = plots.plot_md(few, ax=plt.figure().gca())
    assert n_points(ax) == 2 and fit_lines(ax) == [] and "too few" in ax.get_title()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "pass run="),
        ({"run": "nope"}, "no run ['nope']"),
        ({"run": "ft", "kind": "key"}, "no kind ['key']"),
    ],
)
def test_plot_md_errors_say_what_to_do(layers: pd.DataFrame, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        plots.plot_md(layers, **kwargs)


def test_module_outside_blocks_is_labelled_by_name() -> None:
    df = make_layers({"ft": METHODS["ft"]}, layers=3, kinds=("query",))
    df.loc[df["layer"] == 2, ["layer", "module"]] = [pd.NA, "pooler.dense"]
    ax = plots.plot_md(df)
    assert {t.get_text() for t in ax.texts} == {"0", "1", "pooler.dense"}


# --- the figure 2 grid ------------------------------------------------------------------------


def test_grid_panels_in_paper_order_each_with_points_line_labels(layers: pd.DataFrame) -> None:
    shuffled = layers.sort_values("run", key=lambda s: s.map({"dora": 0, "lora": 1, "ft": 2}), kind="stable")
    g = plots.plot_md_grid(shuffled)
    assert g.axes.shape == (2, 3)  # kinds x runs
    for i, kind in enumerate(["query", "value"]):
        for j, (run, label) in enumerate([("ft", "FT"), ("lora", "LoRA"), ("dora", "DoRA")]):
            ax = g.axes[i, j]
            part = layers.query("run == @run and kind == @kind")
            assert ax.get_title().startswith(f"{label} · {kind}")
            assert n_points(ax) == len(part)
            assert len(fit_lines(ax)) == 1
            assert sorted(t.get_text() for t in ax.texts) == sorted(map(str, part["layer"]))
            r = stats.pearson(part["delta_d"], part["delta_m"])[0]
            assert f"r = {r:+.2f}" in ax.get_title()
    # The paper's panels differ by an order of magnitude: no shared axes.
    ft, dora = g.axes[0, 0], g.axes[0, 2]
    assert not ft.get_shared_x_axes().joined(ft, dora) and not ft.get_shared_y_axes().joined(ft, dora)
    assert ft.get_xlim()[1] < dora.get_xlim()[0]
    assert "ΔD" in g.axes[-1, 0].get_xlabel() and "ΔM" in g.axes[0, 0].get_ylabel()
    legend = [t.get_text() for t in g.legend.get_texts()]
    assert legend[:3] == ["100", "200", "300"] and any("OLS" in t for t in legend)


def test_grid_one_kind_runs_subset_and_wrap(layers: pd.DataFrame) -> None:
    g = plots.plot_md_grid(layers, runs=["dora", "ft"], kinds=["value"])
    assert g.axes.shape == (1, 2)
    assert [ax.get_title().split(" ·")[0] for ax in g.axes.flat] == ["DoRA", "FT"]
    seeds = pd.concat([make_layers(seed=s, kinds=("query",)).assign(run=lambda d, s=s: d["run"] + f"-s{s}") for s in (0, 1)])
    g = plots.plot_md_grid(seeds, runs=["ft-s0", "lora-s0", "dora-s0", "ft-s1", "lora-s1", "dora-s1"], col_wrap=3)
    assert len(g.axes) == 6 and all(len(fit_lines(ax)) == 1 for ax in g.axes)
    with pytest.raises(ValueError, match="col_wrap needs a single kind"):
        plots.plot_md_grid(layers, col_wrap=3)


def test_grid_marks_a_run_without_the_kind(layers: pd.DataFrame) -> None:
    df = layers[~((layers["run"] == "lora") & (layers["kind"] == "value"))]
    g = plots.plot_md_grid(df)
    empty = g.axes[1, 1]
    assert n_points(empty) == 0 and [t.get_text() for t in empty.texts] == ["no matrices"]
    assert all(n_points(ax) > 0 for ax in g.axes.flat if ax is not empty)


def _missing_kinds(layers: pd.DataFrame) -> pd.DataFrame:
    """LoRA without value matrices, and a second LoRA run on query only: two kinds of empty facet."""
    seed1 = make_layers({"lora": METHODS["lora"]}, kinds=("query",), seed=1).assign(run="lora-s1")
    return pd.concat([layers[~((layers["run"] == "lora") & (layers["kind"] == "value"))], seed1], ignore_index=True)


RUNS = [("ft", "ft"), ("lora", "lora"), ("lora-s1", "lora"), ("dora", "dora")]  # run_order of _missing_kinds
EMPTY = {"LoRA · value", "lora-s1 (LoRA) · value"}  # the facets _missing_kinds leaves empty


def _titles(kinds: tuple[str | None, ...], per_run: int = 1) -> list[str]:
    """:func:`plots.panel_title` of every facet, row by row: a row per kind, ``per_run`` columns per run."""
    return [plots.panel_title(r, m, k) for k in kinds for r, m in RUNS for _ in range(per_run)]


# (draw the grid, the first line of each facet's title in order, the titles of its empty facets)
FACET_CASES = {
    "figure 2": (lambda df: plots.plot_md_grid(df), _titles(("query", "value")), EMPTY),
    "figure 2 wrapped": (lambda df: plots.plot_md_grid(df, kinds=["value"], col_wrap=2), _titles(("value",)), EMPTY),
    "heatmaps": (lambda df: plots.plot_heatmap_grid(df, value="delta_m"), _titles(("query", "value")), EMPTY),
    "trajectories by kind": (lambda df: plots.plot_trajectories(df, row="kind"), _titles(("query", "value"), 2), EMPTY),
    # Kinds share a panel here, so no facet is empty.
    "trajectories by run": (lambda df: plots.plot_trajectories(df), [t for t in _titles((None,)) for _ in "MD"], set()),
}


@pytest.mark.parametrize("case", FACET_CASES)
def test_every_facet_is_titled_by_panel_title(layers: pd.DataFrame, case: str) -> None:
    """Filled and empty facets alike: never seaborn's ``run = lora``."""
    draw, expected, empty_titles = FACET_CASES[case]
    g = draw(_missing_kinds(layers))
    titles = [ax.get_title() for ax in g.axes.flat]
    assert [t.splitlines()[0] for t in titles] == expected
    assert not [t for t in titles if "run = " in t or "kind = " in t or " = " in t.splitlines()[0]]
    empty = [ax for ax in g.axes.flat if [t.get_text() for t in ax.texts] == ["no matrices"]]
    assert {ax.get_title().splitlines()[0] for ax in empty} == empty_titles


def test_panel_title() -> None:
    assert plots.panel_title("lora", "lora", "query") == "LoRA · query"
    assert plots.panel_title("seed1", "dora", "q_proj") == "seed1 (DoRA) · q_proj"
    assert plots.panel_title("ft", "ft", None) == "FT · all kinds"


def test_run_order_and_labels() -> None:
    df = pd.DataFrame({"run": ["x", "d", "l", "f", "d2"], "method": ["vera", "dora", "lora", "ft", "dora"]})
    assert plots.run_order(df) == ["f", "l", "d", "d2", "x"]
    assert plots.run_label("lora", "lora") == "LoRA"
    assert plots.run_label("seed1", "dora") == "seed1 (DoRA)"


# --- across training --------------------------------------------------------------------------


def test_trajectories_one_line_per_module_per_quantity(layers: pd.DataFrame) -> None:
    g = plots.plot_trajectories(layers)
    assert g.axes.shape == (3, 2)  # runs x (ΔM, ΔD)
    assert "ΔM" in g.axes[0, 0].get_title() and "ΔD" in g.axes[0, 1].get_title()
    n_modules = layers["module"].nunique()
    for ax, column in zip(g.axes[0], ["delta_m", "delta_d"]):
        lines = fit_lines(ax)
        assert len(lines) == n_modules
        drawn = np.sort(np.concatenate([line.get_ydata() for line in lines]))
        np.testing.assert_allclose(drawn, np.sort(layers.query("run == 'ft'")[column]))
    assert [t.get_text() for t in g.legend.get_texts()][1:5] == ["0", "1", "2", "3"]


LLAMA_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_trajectories_by_kind_one_panel_per_kind(layers: pd.DataFrame) -> None:
    """Seven kinds are not told apart by line style: each (kind, run, quantity) has its own panel."""
    df = make_layers({"ft": METHODS["ft"], "dora": METHODS["dora"]}, layers=3, kinds=LLAMA_KINDS)
    df = df[~((df["run"] == "dora") & (df["kind"] == "down_proj"))]
    g = plots.plot_trajectories(df, row="kind")
    kinds = list(LLAMA_KINDS)  # the model's order, as the rows hold them: q_proj first, down_proj last
    assert g.axes.shape == (len(kinds), 4)  # kinds x (FT ΔM, FT ΔD, DoRA ΔM, DoRA ΔD)
    for i, kind in enumerate(kinds):
        for j, (run, column) in enumerate([("ft", "delta_m"), ("ft", "delta_d"), ("dora", "delta_m"), ("dora", "delta_d")]):
            ax, part = g.axes[i, j], df.query("run == @run and kind == @kind")
            assert ax.get_title().splitlines()[1] == plots.LABELS[column]
            if part.empty:
                assert fit_lines(ax) == [] and [t.get_text() for t in ax.texts] == ["no matrices"]
                continue
            lines = fit_lines(ax)
            assert len(lines) == part["module"].nunique() == 3  # one line per layer, this kind only
            drawn = np.sort(np.concatenate([line.get_ydata() for line in lines]))
            np.testing.assert_allclose(drawn, np.sort(part[column]))
    # Colour is the layer; no line styles, so the legend lists layers only.
    assert [t.get_text() for t in g.legend.get_texts()] == ["0", "1", "2"]
    with pytest.raises(ValueError, match="row must be 'run' or 'kind'"):
        plots.plot_trajectories(df, row="module")


def test_heatmap_layer_by_step(layers: pd.DataFrame) -> None:
    part = layers.query("run == 'dora' and kind == 'query'")
    ax = plots.plot_heatmap(layers, value="delta_m", run="dora", kind="query")
    (mesh,) = [c for c in ax.collections if isinstance(c, QuadMesh)]
    expected = part.pivot(index="layer", columns="step", values="delta_m").to_numpy()
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(expected.shape), expected)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2", "3"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["100", "200", "300"]
    assert "ΔM" in ax.figure.axes[-1].get_ylabel()  # the colour bar
    with pytest.raises(ValueError, match="pass kind"):
        plots.plot_heatmap(layers, run="dora")


def test_heatmap_rows_are_modules_when_layers_repeat() -> None:
    enc = make_layers({"ft": METHODS["ft"]}, layers=2, kinds=("query",))
    dec = enc.assign(module=enc["module"].str.replace("encoder", "decoder"))
    ax = plots.plot_heatmap(pd.concat([enc, dec]))
    assert ax.get_ylabel() == "module" and len(ax.get_yticklabels()) == 4


def test_heatmap_grid_panels(layers: pd.DataFrame) -> None:
    g = plots.plot_heatmap_grid(layers, value="delta_d")
    assert g.axes.shape == (2, 3)
    assert all(any(isinstance(c, QuadMesh) for c in ax.collections) for ax in g.axes.flat)


def test_library_never_shows(layers: pd.DataFrame, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("plt.show() called from library code")

    monkeypatch.setattr(plt, "show", refuse)
    plots.plot_md(layers, run="ft", kind="query")
    plots.plot_md_grid(layers)
    plots.plot_trajectories(layers, kind="query")
    plots.plot_heatmap_grid(layers, value="delta_m")


def test_update_spectra_one_line_per_run_normalised_to_sigma_1() -> None:
    from dora_analysis.plots import plot_update_spectra

    rows = []
    for run, method, values in (("ft", "ft", [4.0, 2.0, 1.0, 0.5]), ("lora", "lora", [3.0, 0.3])):
        for module in ("a", "b"):
            rows += [{"run": run, "method": method, "step": 5, "module": module, "i": i + 1, "sigma": v} for i, v in enumerate(values)]
            rows += [{"run": run, "method": method, "step": 1, "module": module, "i": 1, "sigma": 9.0}]  # not the last step
    ax = plot_update_spectra(pd.DataFrame(rows))
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines) == ["FT", "LoRA"]
    assert list(lines["FT"].get_ydata()) == [1.0, 0.5, 0.25, 0.125]
    assert list(lines["LoRA"].get_xdata()) == [1, 2]  # a rank-2 update stops at 2
    plt.close(ax.figure)
