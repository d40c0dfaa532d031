"""Evaluation during and after training: evalEvery, the history, the best checkpoint, and
``kontrast evaluate`` reproducing the run's own evaluations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kontrast.trainer.evaluation.job import evaluate_trainjob


def test_periodic_evaluation_history_best_checkpoint_and_evaluate(run_training, base_spec, h, tmp_path):
    summary, r = run_training({**base_spec, "epochs": 3, "evalEvery": 1, "saveFrequency": 3})
    history = summary["evalHistory"]
    assert [(e["epoch"], e["phase"]) for e in history] == [(0, "before"), (1, "epoch"), (2, "epoch"), (3, "after")]
    events = [e for e in h.read_jsonl(Path(r.params.output) / "progress.jsonl") if e["event"] == "eval"]
    assert [e["epoch"] for e in events] == [0, 1, 2, 3] and events[-1]["history"] == history

    # The best by nDCG@10 among the evaluated, checkpointed epochs; a new best forces a checkpoint.
    scores = {e["epoch"]: e["metrics"]["ndcg@10"] for e in history if e["epoch"] > 0}
    best = summary["best"]
    assert best["epoch"] == max(scores, key=scores.get) and best["ndcg@10"] == scores[best["epoch"]]
    assert best["uri"] in [c["uri"] for c in summary["checkpoints"]]
    assert summary["checkpoints"][-1]["epoch"] == 3

    # kontrast evaluate: the starting model gives eval.before, the last checkpoint eval.after.
    top_k = tmp_path / "top.npz"
    after = evaluate_trainjob(r, checkpoint=summary["checkpoints"][-1]["uri"], device="cpu", top_k_file=str(top_k))
    before = evaluate_trainjob(r, device="cpu")
    for ours, theirs in ((after["metrics"], summary["eval"]["after"]), (before["metrics"], summary["eval"]["before"])):
        assert ours.keys() == theirs.keys()
        assert all(ours[k] == pytest.approx(theirs[k], rel=1e-6) for k in ours)
    saved = np.load(top_k)
    assert saved["top_docs"].shape[0] == len(saved["query_rows"]) == after["metrics"]["queries"]
    assert (saved["top_scores"][:, :-1] >= saved["top_scores"][:, 1:]).all()   # best first
