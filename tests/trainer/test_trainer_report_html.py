"""The run report (report.html, plots/*.png, gallery.json), checked in a real headless Chromium,
and the TensorBoard event files, read back with TensorBoard's own reader."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from kontrast.cli import main as cli_main
from kontrast.trainer.ship.gallery import QUERIES, TOP_K

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(page: Path, tmp_path: Path, *extra: str) -> tuple[str, str]:
    """Run headless Chromium on a file; returns (stdout, the console lines of its log)."""
    assert CHROMIUM, "Chromium is missing: `make chromium` installs it (Debian package chromium)"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", *extra, page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, "\n".join(line for line in proc.stderr.splitlines() if ":CONSOLE" in line)


def render(page: Path, tmp_path: Path, screenshot: Path | None = None) -> tuple[str, str]:
    dom, console = chromium(page, tmp_path, "--dump-dom")
    if screenshot is not None:
        chromium(page, tmp_path, f"--screenshot={screenshot}", "--window-size=1200,2400", "--hide-scrollbars")
    return dom, console


def data_images(dom: str, css_class: str) -> list[Image.Image]:
    uris = re.findall(rf"<img class=\"{css_class}\"[^>]*src=\"data:image/png;base64,([^\"]+)\"", dom)
    return [Image.open(io.BytesIO(base64.b64decode(u))) for u in uris]


def test_the_console_check_sees_script_errors(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><body><script>console.error('boom'); missing();</script></body></html>")
    _, console = render(page, tmp_path)
    assert "boom" in console and "Uncaught ReferenceError" in console


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_json, small_data, h):
    """One evaluated 2-epoch run shared by the report tests."""
    from kontrast.trainer.spec import resolve
    from kontrast.trainer.run.train import train

    out = tmp_path_factory.mktemp("run") / "out"
    spec = {"model": str(tiny_model_json), "trainData": str(small_data / "train.csv"),
            "evalData": str(small_data / "eval.csv"), "output": str(out),
            "leftKeys": ["query"], "leftWeights": [1.0], "rightKeys": ["image", "title"],
            "rightWeights": [0.5, 0.5], "weightKey": "score", "batchSize": 16, "epochs": 2, "warmup": 2,
            "lr": 1.0e-3, "contextLength": 8, "gradCheckpointing": False, "precision": "fp32", "workers": 0}
    summary = train(resolve(h.trainjob(spec, name="report-run"), out.parent / "t.yaml"), device="cpu")
    return out, summary


def test_report_renders_curves_and_the_gallery_in_chromium(finished_run, tmp_path):
    out, summary = finished_run
    assert summary["outputs"]["report"] == str(out / "report.html")
    assert summary["outputs"]["plots"] == str(out / "plots")
    gallery = json.loads((out / "gallery.json").read_text())
    assert len(gallery["queries"]) == QUERIES
    assert all(set(q["results"]) == {"before", "after"} and all(len(r) == TOP_K for r in q["results"].values())
               for q in gallery["queries"])

    shot = tmp_path / "report.png"
    dom, console = render(out / "report.html", tmp_path, screenshot=shot)
    assert console == ""                                          # no console message at all
    assert "Finished: 8 steps, 2 epochs" in dom
    charts = data_images(dom, "chart")
    stems = {p.stem for p in (out / "plots").iterdir()}
    assert stems == {"loss", "lr", "throughput", "grad_norm", "time", "eval"} and len(charts) == len(stems)
    assert all(img.size[0] > 300 for img in charts)               # real plots, decoded
    thumbs = data_images(dom, "thumb")
    assert len(thumbs) == QUERIES * 2 * TOP_K                     # every document of the eval set has an image
    relevant_marked = dom.count("relevant: grade")
    expected = sum(1 for q in gallery["queries"] for rs in q["results"].values() for r in rs
                   if str(r["doc"]) in q["relevant"])
    assert relevant_marked == expected > 0
    screenshot = Image.open(shot).convert("L")
    colours = screenshot.getcolors(maxcolors=1 << 16) or range(1 << 16)
    assert screenshot.size == (1200, 2400) and len(colours) > 20       # something was drawn


def test_report_command_rebuilds_a_run_in_progress_and_a_resumed_run_keeps_its_before(run_training, base_spec, tmp_path, capsys):
    run_training({**base_spec, "epochs": 3}, max_epochs=1)
    out = Path(base_spec["output"])
    assert not (out / "summary.json").exists() and not (out / "report.html").exists()
    assert cli_main(["report", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert str(out / "report.html") in printed and str(out / "plots" / "loss.png") in printed
    dom, console = render(out / "report.html", tmp_path)
    assert console == "" and "In progress: step 4 of 12, epoch 1 of 3" in dom
    assert len(data_images(dom, "thumb")) == QUERIES * TOP_K     # the starting model's row only
    assert 'data-phase="before"' in dom and 'data-phase="after"' not in dom
    before = json.loads((out / "gallery.json").read_text())

    summary, _ = run_training({**base_spec, "epochs": 3})             # resume to the end
    after = json.loads((out / "gallery.json").read_text())
    assert [q["results"]["before"] for q in after["queries"]] == [q["results"]["before"] for q in before["queries"]]
    assert all(len(q["results"]["after"]) == TOP_K for q in after["queries"])
    dom, console = render(out / "report.html", tmp_path)
    assert console == "" and "Finished: 12 steps, 3 epochs" in dom and 'data-phase="after"' in dom


def test_report_command_names_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path)]) == 1
    assert "progress.jsonl" in capsys.readouterr().err


def test_tensorboard_scalars_match_progress_jsonl(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = finished_run
    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    tags = set(board.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/logit_scale", "train/grad_norm", "perf/samples_per_second",
            "perf/data_wait_seconds", "perf/compute_seconds", "eval/ndcg@10", "eval/map"} <= tags
    steps = [e for e in map(json.loads, (out / "progress.jsonl").read_text().splitlines()) if e["event"] == "step"]
    logged = {s.step: s.value for s in board.Scalars("train/loss")}
    assert logged.keys() == {e["step"] for e in steps}
    for e in steps:
        assert logged[e["step"]] == pytest.approx(e["loss"], rel=1e-6)
        assert e["gradNorm"] > 0 and e["dataWaitSeconds"] >= 0 and e["computeSeconds"] > 0
    assert [s.step for s in board.Scalars("eval/ndcg@10")] == [0, 8]   # before training, after the last step


def test_the_plot_legends_stand_beside_the_curves_not_over_them(finished_run):
    """Every legend's box is outside its axes' data area (it once sat over the eval curves)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from kontrast.trainer.ship.report_page import make_figures
    from kontrast.trainer.ship.run_files import read_run

    out, _ = finished_run
    figures = make_figures(read_run(str(out)))
    legends = 0
    for stem, fig in figures.items():
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        renderer = canvas.get_renderer()
        for ax in fig.axes:
            if ax.get_legend() is None:
                continue
            legends += 1
            box, area = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
            assert not box.overlaps(area), f"{stem}: the legend {box} covers the axes {area}"
            assert box.x1 <= fig.bbox.x1 + 1, f"{stem}: the legend is cut off at the figure's right edge"
    assert legends >= 2                                                # eval and time


def test_report_files_are_readable_by_the_volumes_other_users(finished_run):
    """report.html and the plots follow the umask (0644 under 022), not mkstemp's 0600."""
    import os
    import stat

    from kontrast.trainer.ship.report_page import write_report

    out, _ = finished_run
    old = os.umask(0o027)
    try:
        written = write_report(str(out))
    finally:
        os.umask(old)
    assert str(out / "report.html") in written and len(written) > 1
    assert {stat.S_IMODE(os.stat(p).st_mode) for p in written} == {0o640}
    os.umask(old)
    written = write_report(str(out))
    assert {stat.S_IMODE(os.stat(p).st_mode) for p in written} == {0o666 & ~old}
