"""The run report: ``report.html`` and ``plots/*.png`` in the output folder.

Both are rebuilt from the run's files alone (``run_files``: progress.jsonl, summary.json,
gallery.json), so ``kontrast report OUTPUT`` works during a run, after it, and on a copy.
The page is self-contained: the plots are inline PNGs and there is no script, so it opens
offline, from a bucket or as a CI artifact. Plots use matplotlib's Agg backend (no display).
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any, Callable, Optional

from kontrast.api.eval_sets import EVAL_DATA_SET

from .. import storage
from ..layout import OutputFolder
from ..report.tensorboard import available as tensorboard_available
from .run_files import RunFiles, read_run


def run_outputs(output: str, *, model: bool) -> dict[str, str]:
    """Where a finished run's report, plots, exported model and TensorBoard logs are (status.outputs)."""
    folder = OutputFolder(output)
    out = {"report": folder.report, "plots": folder.plots}
    if model:
        out["model"] = folder.model
    if tensorboard_available():
        out["tensorboard"] = folder.tensorboard
    return out


#: (file stem, title, y label, [(series label, step-event key)]) of the per-step plots.
STEP_PLOTS = (
    ("loss", "Training loss", "loss", [("loss", "loss")]),
    ("lr", "Learning rate", "lr", [("lr", "lr")]),
    ("throughput", "Throughput", "samples/s", [("samples/s", "samplesPerSecond")]),
    ("grad_norm", "Gradient norm (before clipping)", "L2 norm", [("grad norm", "gradNorm")]),
    ("time", "Time per step", "seconds", [("data wait", "dataWaitSeconds"), ("compute", "computeSeconds")]),
)


def _series(steps: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(e["step"], e[key]) for e in steps if isinstance(e.get(key), (int, float))]
    return [p[0] for p in pairs], [float(p[1]) for p in pairs]


def _eval_series(run: RunFiles, eval_set: Optional[str] = None) -> dict[str, tuple[list[int], list[float]]]:
    """metric -> (epochs, values) over the evaluations (before = epoch 0), of the set named
    ``eval_set`` (default: the first)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for e in run.of("eval"):
        metrics = (e.get("sets") or {}).get(eval_set) if eval_set else e.get("metrics")
        for name, value in (metrics or {}).items():
            if isinstance(value, float):
                xs, ys = out.setdefault(name, ([], []))
                xs.append(int(e.get("epoch") or 0))
                ys.append(value)
    return out


def _figure(draw: Callable[[Any], None]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 3.0), dpi=100, layout="tight")
    draw(fig.add_subplot())
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _legend_beside(ax: Any) -> None:
    """The legend right of the axes, never over the curves (the tight layout makes room)."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small")


def make_plots(run: RunFiles) -> dict[str, bytes]:
    """File stem -> PNG bytes, for every curve the run has data for."""
    return {stem: _png(fig) for stem, fig in make_figures(run).items()}


def make_figures(run: RunFiles) -> dict[str, Any]:
    """File stem -> matplotlib Figure, for every curve the run has data for."""
    steps = run.steps()
    plots: dict[str, Any] = {}
    for stem, title, ylabel, series in STEP_PLOTS:
        data = [(label, *_series(steps, key)) for label, key in series]
        data = [d for d in data if d[1]]
        if not data:
            continue

        def draw(ax, data=data, title=title, ylabel=ylabel):
            for label, xs, ys in data:
                ax.plot(xs, ys, label=label, marker="." if len(xs) < 30 else None)
            ax.set(title=title, xlabel="step", ylabel=ylabel)
            ax.grid(alpha=0.3)
            if len(data) > 1:
                _legend_beside(ax)

        plots[stem] = _figure(draw)
    for stem, title, eval_set in _eval_plots(run):
        evals = _eval_series(run, eval_set)
        if not evals:
            continue

        def draw_eval(ax, evals=evals, title=title):
            for name, (xs, ys) in sorted(evals.items()):
                ax.plot(xs, ys, marker="o", label=name)
            from matplotlib.ticker import MaxNLocator

            ax.set(title=title, xlabel="epoch (0 = before training)", ylabel="score")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            _legend_beside(ax)

        plots[stem] = _figure(draw_eval)
    return plots


def _eval_plots(run: RunFiles) -> list[tuple[str, str, Optional[str]]]:
    """(file stem, title, eval set) of the metric plots: one (eval.png) with one eval set, one
    per set (eval-<name>.png) with several."""
    names = run.eval_set_names()
    if len(names) <= 1:
        return [("eval", f"Retrieval metrics on {names[0] if names and names[0] != EVAL_DATA_SET else 'evalData'}",
                 None)]
    return [(f"eval-{name}", f"Retrieval metrics on {name}", name) for name in names]


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4}.charts img{margin:4px;border:1px solid #eee}
.query{margin:14px 0}.row{display:flex;gap:8px;align-items:flex-start;margin:4px 0}
.label{width:70px;font-weight:bold;padding-top:30px}
.doc{width:120px;border:1px solid #ddd;padding:4px;font-size:12px;background:#fff}
.doc.relevant{border:2px solid #2a8a2a;background:#f0fff0}.doc img{width:96px;height:96px;object-fit:contain}
.grade{color:#2a8a2a;font-weight:bold}.score{color:#666}.muted{color:#777}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return "" if value is None else str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _status_line(run: RunFiles) -> str:
    steps = run.steps()
    last = steps[-1] if steps else {}
    if run.summary:
        return (f"Finished: {run.summary.get('step')} steps, {run.summary.get('epoch')} epochs in "
                f"{run.summary.get('durationSeconds')} s; final loss {_fmt(run.summary.get('finalLoss'))}.")
    if last:
        return (f"In progress: step {last.get('step')} of {last.get('totalSteps')}, epoch {last.get('epoch')} "
                f"of {last.get('epochs')}, loss {_fmt(last.get('loss'))} (as of {last.get('time')}).")
    return "Started; no step logged yet."


def _metrics_section(run: RunFiles) -> str:
    """One table, or one per eval set (the first marked as the one that selects the best checkpoint)."""
    names = run.eval_set_names()
    if len(names) <= 1:
        header, rows = run.eval_table()
        return _table(header, rows) if rows else "<p class='muted'>No evaluation yet (or no evalData).</p>"
    parts = []
    for i, name in enumerate(names):
        note = " <span class='muted'>(selects the best checkpoint)</span>" if i == 0 else ""
        parts.append(f"<h3 data-eval-set='{_e(name)}'>{_e(name)}{note}</h3>{_table(*run.eval_table(name))}")
    return "".join(parts)


def _hard_negatives_section(run: RunFiles) -> str:
    """Each mining of spec.hardNegatives: when, for how many queries, how many kept and dropped."""
    rounds = run.of("hardNegatives")
    if not rounds:
        return ""
    latest = {r.get("epoch"): r for r in rounds}    # a resumed run reports its cached round again
    rows = [[r.get("epoch"), r.get("queries"), r.get("mined"), r.get("dropped")] for r in latest.values()]
    return ("<h2>Hard negatives</h2><p>Mined before the epoch shown; dropped: candidates above the margin, "
            "taken for unlabelled positives.</p>" + _table(["before epoch", "queries", "mined", "dropped"], rows))


def _doc_card(doc: dict[str, Any], info: dict[str, Any], relevant: dict[str, float]) -> str:
    grade = relevant.get(str(doc["doc"]))
    image = f"<img class='thumb' src='{info['image']}' alt=''>" if info.get("image") else ""
    badge = (f"<div class='grade'>relevant: grade {_fmt(grade)}</div>" if grade
             else "<div class='muted'>not relevant</div>")
    return (f"<div class='doc{' relevant' if grade else ''}'>{image}<div>{_e(info.get('title'))}</div>"
            f"{badge}<div class='score'>score {doc['score']:.3f}</div></div>")


def _gallery_section(gallery: Optional[dict[str, Any]]) -> str:
    if not gallery or not gallery.get("queries"):
        return "<p class='muted'>No gallery (it needs evalData).</p>"
    docs = gallery.get("documents", {})
    parts = [f"<p>Top {gallery.get('k')} documents of the starting and the trained model for a few eval "
             "queries; relevant ones are framed green with their grade.</p>"]
    for q in gallery["queries"]:
        rows = []
        for phase, results in q.get("results", {}).items():
            cards = "".join(_doc_card(r, docs.get(str(r["doc"]), {}), q.get("relevant", {})) for r in results)
            rows.append(f"<div class='row' data-phase='{_e(phase)}'><div class='label'>{_e(phase)}</div>"
                        f"{cards}</div>")
        parts.append(f"<div class='query'><h3>{_e(q.get('text'))}</h3>"
                     f"<div class='muted'>{len(q.get('relevant', {}))} relevant document(s)</div>{''.join(rows)}</div>")
    return "".join(parts)


def render_html(run: RunFiles, plots: dict[str, bytes]) -> str:
    summary = run.summary or {}
    start = run.start
    name = summary.get("name") or start.get("name") or "kontrast run"
    params = summary.get("parameters") or start.get("parameters") or {}
    resolved = summary.get("resolved") or start.get("resolved") or {}
    charts = "".join(f"<img class='chart' alt='{_e(stem)}' src='data:image/png;base64,"
                     f"{base64.b64encode(png).decode('ascii')}'>" for stem, png in plots.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(name)}: kontrast report</title>
<style>{CSS}</style></head><body>
<h1>{_e(name)}</h1>
<p>{_e(_status_line(run))} Output: <code>{_e(run.output)}</code></p>
<h2>Retrieval metrics</h2>{_metrics_section(run)}
{_hard_negatives_section(run)}<h2>Curves</h2><div class="charts">{charts or "<p class='muted'>No steps logged yet.</p>"}</div>
<h2>Before / after retrieval</h2><div class="gallery">{_gallery_section(run.gallery)}</div>
<h2>Parameters</h2>{_table(["parameter", "value"], [[k, v] for k, v in sorted(params.items())])}
<h2>Resolved by the trainer</h2>{_table(["value", "resolved"], [[k, v] for k, v in sorted(resolved.items())])}
</body></html>
"""


def write_report(output: str) -> list[str]:
    """Rewrite report.html and plots/*.png from the run's files; returns what was written."""
    run = read_run(output)
    plots = make_plots(run)
    written = []
    folder = OutputFolder(output)
    for stem, png in plots.items():
        location = folder.plot(stem)
        storage.write_atomic(location, lambda f, png=png: f.write(png))
        written.append(location)
    location = folder.report
    storage.write_text(location, render_html(run, plots))
    return [location, *written]
