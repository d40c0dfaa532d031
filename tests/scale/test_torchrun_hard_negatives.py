"""Mined hard negatives under torchrun: 2 gloo processes, each mining its share of the queries
and candidates, with batchSize 4 x accumFreq 2 and localLoss, train like 1 process with
batchSize 16 (the same global batches, the same negatives, the same weights), under the
ranked ce and under siglip."""

from __future__ import annotations

import json

import pytest
from scale.test_torchrun import assert_same_weights, events, losses, run_local, run_torchrun, tiny_example, weights, write_job

HARD = {"perQuery": 2, "margin": 0.05}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tiny_example(tmp_path_factory.mktemp("torchrun_hn"))
    for kind, a, b in (("ce", "A", "B"), ("siglip", "SA", "SB")):
        run_local(write_job(folder, a, hardNegatives=HARD, weightedLoss=kind))
        run_torchrun(write_job(folder, b, batchSize=4, accumFreq=2, localLoss=True, hardNegatives=HARD,
                               weightedLoss=kind))
    return folder


def mined(out):
    return [e for e in events(out) if e["event"] == "hardNegatives"]


@pytest.mark.distributed
@pytest.mark.parametrize("one, two", [("A", "B"), ("SA", "SB")], ids=["ce", "siglip"])
def test_two_processes_mine_and_train_like_one(runs, one, two):
    a, b = mined(runs / one), mined(runs / two)
    assert len(a) == len(b) == 1 and a[0]["mined"] > 0
    assert {k: a[0][k] for k in ("mined", "dropped", "queries")} == {k: b[0][k] for k in ("mined", "dropped", "queries")}
    assert len(list((runs / two / "hard_negatives").iterdir())) == 1
    assert losses(runs / two) == pytest.approx(losses(runs / one), rel=1e-4, abs=1e-5)
    assert_same_weights(weights(runs / one), weights(runs / two))
    summary = json.loads((runs / two / "summary.json").read_text())
    assert summary["hardNegatives"]["mined"] == a[0]["mined"] and summary["resolved"]["worldSize"] == 2
