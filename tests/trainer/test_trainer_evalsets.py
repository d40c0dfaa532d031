"""Several named eval sets (evalSets): every evaluation runs each set, and progress.jsonl,
summary.json, the status patch, the report and the model card show the metrics per set; the
first set selects the best checkpoint. On 1 process and under torchrun with 2 gloo processes
(accumFreq 2, localLoss), and fed with the files of ``kontrast split``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from kontrast.trainer.evaluation.job import evaluate_trainjob
from kontrast.trainer.report.cluster_status import conform, eval_patch, status_schema
from numeric import assert_rel_close

METRICS = {"ndcg@10", "mrr@10", "recall@10", "map", "queries"}


@pytest.fixture(scope="module")
def two_sets(small_data, tmp_path_factory) -> dict[str, Path]:
    """The small eval file cut in two halves: two sets with different queries and documents."""
    with open(small_data / "eval.csv", newline="") as f:
        rows = list(csv.reader(f))
    folder = small_data   # beside the images, whose paths are relative to the file's folder
    out = {}
    for name, part in (("in-domain", rows[1:21]), ("zero-shot", rows[21:41])):
        out[name] = folder / f"eval_{name}.csv"
        with open(out[name], "w", newline="") as f:
            csv.writer(f).writerows([rows[0], *part])
    return out


def sets_spec(base_spec: dict, files: dict[str, Path], **overrides) -> dict:
    spec = {**base_spec, "evalSets": [{"name": n, "data": str(p)} for n, p in files.items()], **overrides}
    spec.pop("evalData")
    return spec


def eval_events(output: str, h) -> list[dict]:
    return [e for e in h.read_jsonl(Path(output) / "progress.jsonl") if e["event"] == "eval"]


def metric_vector(metrics: dict[str, float]) -> np.ndarray:
    """One set's metrics as a vector in key order, for a relative-norm comparison."""
    return np.array([metrics[k] for k in sorted(metrics)])


# ------------------------------------------------------------------------------------------------

def test_two_eval_sets_give_per_set_metrics_everywhere(run_training, base_spec, two_sets, h):
    summary, r = run_training(sets_spec(base_spec, two_sets, epochs=2, evalEvery=1, saveFrequency=2))
    names = ["in-domain", "zero-shot"]
    out = Path(r.params.output)

    # summary.json: the first set's before/after as before, every set's under sets.
    on_disk = json.loads((out / "summary.json").read_text())
    ev = on_disk["eval"]
    assert list(ev["sets"]) == names and ev["selectBy"] == "in-domain"
    for name in names:
        for phase in ("before", "after"):
            assert METRICS <= ev["sets"][name][phase].keys()
    assert ev["before"] == ev["sets"]["in-domain"]["before"] and ev["after"] == ev["sets"]["in-domain"]["after"]
    assert ev["sets"]["in-domain"]["after"] != ev["sets"]["zero-shot"]["after"]   # different data, different numbers

    # progress.jsonl: every evaluation holds both sets, the flat metrics are the first's.
    events = eval_events(r.params.output, h)
    assert [(e["epoch"], e["phase"]) for e in events] == [(0, "before"), (1, "epoch"), (2, "after")]
    for e in events:
        assert list(e["sets"]) == names and e["metrics"] == e["sets"]["in-domain"] and e["selectBy"] == "in-domain"
    assert [list(x["sets"]) for x in on_disk["evalHistory"]] == [names] * 3

    # The best checkpoint is chosen by the first set's nDCG@10 and says so.
    scores = {e["epoch"]: e["sets"]["in-domain"]["ndcg@10"] for e in events if e["epoch"] > 0}
    best = on_disk["best"]
    assert best["evalSet"] == "in-domain" and best["ndcg@10"] == scores[best["epoch"]]

    # Each set's metrics are what evaluating that file alone gives (kontrast evaluate).
    alone = evaluate_trainjob(r, checkpoint=summary["checkpoints"][-1]["uri"], device="cpu")
    assert list(alone["sets"]) == names
    for name in names:
        assert_rel_close(metric_vector(alone["sets"][name]), metric_vector(ev["sets"][name]["after"]), 1e-6,
                         msg=name)

    # The report: a table and a plot per set; the model card: a table per set and each set's file.
    html = (out / "report.html").read_text()
    for name in names:
        assert f"data-eval-set='{name}'" in html and (out / "plots" / f"eval-{name}.png").exists()
    assert not (out / "plots" / "eval.png").exists()
    card = (out / "model" / "README.md").read_text()
    for name in names:
        assert f"### {name}" in card and f"eval set {name}" in card and str(two_sets[name]) in card
    assert "`in-domain`, selects the best checkpoint" in card


def test_status_patch_of_several_sets_is_small_and_conforms(base_spec, two_sets):
    """What the cluster reporter sends: the first set's tables, every set's before/latest, and
    per evaluation only each set's nDCG@10 in the history; nothing the schema would drop."""
    sets = {"in-domain": {"ndcg@10": 0.5, "mrr@10": 0.4, "queries": 10.0},
            "zero-shot": {"ndcg@10": 0.2, "mrr@10": 0.1, "queries": 5.0}}
    history = [{"epoch": 0, "phase": "before", "metrics": sets["in-domain"], "sets": sets}]
    event = {"epoch": 0, "phase": "before", "metrics": sets["in-domain"], "selectBy": "in-domain", "sets": sets,
             "history": history, "best": None}
    patch = eval_patch(event)
    assert conform(patch, status_schema()) == patch
    metrics = patch["metrics"]
    assert metrics["before"] == metrics["latest"] == sets["in-domain"] and metrics["selectBy"] == "in-domain"
    assert metrics["sets"] == {n: {"latest": m, "before": m} for n, m in sets.items()}
    assert metrics["history"][0]["sets"] == {"in-domain": {"ndcg@10": 0.5}, "zero-shot": {"ndcg@10": 0.2}}


@pytest.mark.distributed
def test_two_processes_with_accumulation_and_local_loss_measure_each_set_like_one(
        run_training, base_spec, two_sets, tmp_path, h):
    """2 processes x batchSize 4 x accumFreq 2 with localLoss see the global batches of 1 process
    x batchSize 16, so every set's metrics before, during and after training agree; each rank
    evaluates its share of every set."""
    common = dict(epochs=2, evalEvery=1, localLoss=True, seed=3)
    one, _ = run_training(sets_spec(base_spec, two_sets, batchSize=16, **common,
                                    output=str(tmp_path / "one")))
    spec = sets_spec(base_spec, two_sets, batchSize=4, accumFreq=2, **common, output=str(tmp_path / "two"))
    job = tmp_path / "two.yaml"
    job.write_text(yaml.safe_dump(h.trainjob(spec, name="two")))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "kontrast.trainer", str(job), "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["resolved"]["worldSize"] == 2 and two["resolved"]["globalBatchSize"] == 16
    assert [(e["epoch"], list(e["sets"])) for e in two["evalHistory"]] == \
        [(e["epoch"], list(e["sets"])) for e in one["evalHistory"]]
    for a, b in zip(one["evalHistory"], two["evalHistory"]):
        assert a["sets"].keys() == b["sets"].keys()
        for name in a["sets"]:
            assert a["sets"][name].keys() == b["sets"][name].keys()
            assert_rel_close(metric_vector(b["sets"][name]), metric_vector(a["sets"][name]), 1e-6,
                             msg=f"{name} at epoch {a['epoch']}")
    assert len(eval_events(str(tmp_path / "two"), h)) == 3   # rank 0 alone reports
    assert one["evalHistory"][0]["sets"] != one["evalHistory"][-1]["sets"]   # training moved the metrics


@pytest.fixture(scope="module")
def split_folder(example_data, tmp_path_factory) -> Path:
    """160 rows of the example data with 16-pixel images, split by ``kontrast split`` into its
    folder (beside the images: image paths are relative to a file's folder)."""
    from kontrast.cli import main

    folder = tmp_path_factory.mktemp("split")
    with open(example_data / "train.csv", newline="") as f:
        rows = list(csv.reader(f))[:161]
    for _, img, _, _ in rows[1:]:
        if not (folder / img).exists():
            (folder / img).parent.mkdir(parents=True, exist_ok=True)
            Image.open(example_data / img).resize((16, 16)).save(folder / img)
    with open(folder / "all.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    assert main(["split", str(folder / "all.csv"), str(folder), "--fraction", "0.25"]) == 0
    return folder


SPLITS = {"in-domain": "eval_in_domain", "novel-queries": "eval_novel_queries",
          "novel-documents": "eval_novel_documents", "zero-shot": "eval_zero_shot"}


def test_kontrast_split_output_as_eval_sets(run_training, base_spec, split_folder, h):
    spec = {**base_spec, "trainData": str(split_folder / "train.csv"), "epochs": 1,
            "evalSets": [{"name": n, "data": str(split_folder / f"{stem}.csv")} for n, stem in SPLITS.items()]}
    spec.pop("evalData")
    summary, r = run_training(spec)
    assert list(summary["eval"]["sets"]) == list(SPLITS)
    for name, stem in SPLITS.items():
        with open(split_folder / f"{stem}.csv", newline="") as f:
            queries = {row["query"] for row in csv.DictReader(f)}
        assert summary["eval"]["sets"][name]["after"]["queries"] == len(queries)
    assert summary["eval"]["after"] == summary["eval"]["sets"]["in-domain"]["after"]


def test_terminal_and_metric_stores_name_each_set():
    """The terminal prints a line per set (the first marked); TensorBoard and MLflow get the
    first set's metrics as before and every set's under its name; one set stays as it was."""
    import io

    from kontrast.trainer.report.reporters import TerminalReporter, eval_scalars

    sets = {"in-domain": {"ndcg@10": 0.5}, "zero-shot": {"ndcg@10": 0.25}}
    event = {"phase": "after", "epoch": 2, "metrics": sets["in-domain"], "sets": sets, "selectBy": "in-domain"}
    stream = io.StringIO()
    TerminalReporter(stream).on_eval(event)
    assert stream.getvalue().splitlines() == ["  eval after in-domain (selects): ndcg@10 0.5000",
                                              "  eval after zero-shot: ndcg@10 0.2500"]
    assert eval_scalars(event) == {"ndcg@10": 0.5, "in-domain/ndcg@10": 0.5, "zero-shot/ndcg@10": 0.25}
    one = {**event, "sets": {"eval": sets["in-domain"]}}
    assert eval_scalars(one) == {"ndcg@10": 0.5}


def test_a_resumed_run_keeps_every_sets_before(run_training, base_spec, two_sets, h):
    """The checkpoint holds each set's metrics before training, so a run resumed after epoch 1
    still reports them per set in summary.json."""
    spec = sets_spec(base_spec, two_sets, epochs=2)
    first, r = run_training(spec, max_epochs=1)
    assert first["stopped"]
    before = eval_events(r.params.output, h)[0]["sets"]
    summary, _ = run_training(spec)
    assert {n: s["before"] for n, s in summary["eval"]["sets"].items()} == before
    assert summary["eval"]["before"] == before["in-domain"]
