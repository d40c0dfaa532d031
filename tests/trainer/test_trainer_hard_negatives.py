"""Mined hard negatives (spec.hardNegatives): the choice per query (pure), the mining pass on
a tiny model, a run on 1 process with its counts in status, summary.json and the report, and
the cache a resumed run reads instead of mining again."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kontrast.trainer.mining.negatives import Candidates, MinedNegatives, PositivePairs, select_negatives


# --- the choice per query (pure) -------------------------------------------------------------

def test_known_positives_are_never_chosen_and_the_margin_drops_the_near_ones():
    # query 0: candidates ranked 5 (its positive), 3 (0.79 > 0.8 x 0.95 = 0.76: dropped), 7, 2, 4
    top = np.array([[5, 3, 7, 2, 4]])
    scores = np.array([[0.80, 0.79, 0.70, 0.60, 0.50]])
    positive = np.array([[True, False, False, False, False]])
    chosen, dropped = select_negatives(top, scores, positive, np.array([0.8]), per_query=2, margin=0.05)
    assert chosen.tolist() == [[7, 2]] and dropped.tolist() == [1]
    # margin 0: only candidates scoring above the positive are dropped
    chosen, dropped = select_negatives(top, scores, positive, np.array([0.8]), per_query=2, margin=0.0)
    assert chosen.tolist() == [[3, 7]] and dropped.tolist() == [0]


def test_a_query_without_a_scored_positive_mines_nothing_and_short_lists_pad():
    top = np.array([[1, 2, -1], [2, 1, -1]])
    scores = np.array([[0.5, 0.4, -np.inf], [0.9, 0.1, -np.inf]])
    positive = np.zeros_like(top, dtype=bool)
    chosen, dropped = select_negatives(top, scores, positive, np.array([np.nan, 0.95]), per_query=3, margin=0.1)
    assert chosen.tolist() == [[-1, -1, -1], [1, -1, -1]]
    assert dropped.tolist() == [0, 1]


def test_positive_pairs_use_the_table_identities_and_the_lowest_positive_score():
    candidates = Candidates(rows=np.array([0, 1, 3]), ids=np.array([10, 11, 12]))
    query_ids = np.array([0, 1])
    # query 0: documents 10 (w 2) and 12 (w 1); query 1: document 11 (w 0, a stated negative) and 99 (not a candidate)
    pairs = PositivePairs.of_table(query_ids, np.array([0, 0, 1, 1]), np.array([10, 12, 11, 99]),
                                   np.array([2.0, 1.0, 0.0, 1.0]), candidates)
    assert sorted(zip(pairs.q.tolist(), pairs.c.tolist())) == [(0, 0), (0, 2)]
    top = np.array([[2, 1, 0], [1, 0, 2]])
    assert pairs.mask(top).tolist() == [[True, False, True], [False, False, False]]
    low = pairs.lowest_score(np.array([0.9, 0.6]), 2)
    assert low[0] == pytest.approx(0.6) and np.isnan(low[1])


def test_mined_negatives_look_up_by_query_id():
    mined = MinedNegatives(np.array([3, 8]), np.array([[1, -1], [4, 5]]), np.array([21, -1, 24, 25]).reshape(2, 2),
                           dropped=2, epoch=0)
    assert mined.of_query(8)[0].tolist() == [4, 5] and mined.of_query(4)[0].tolist() == [-1, -1]
    assert mined.counts() == {"mined": 3, "dropped": 2, "queries": 2, "epoch": 0}


# --- runs ------------------------------------------------------------------------------------

def _hard(spec, **settings):
    return {**spec, "hardNegatives": {"perQuery": 2, **settings}}


def test_a_run_mines_before_training_and_reports_the_counts(base_spec, run_training, h, tmp_path):
    from kontrast.trainer.report.reporters import Reporter

    class Seen(Reporter):
        def __init__(self):
            self.mined = []

        def on_mined(self, counts):
            self.mined.append(counts)

    seen = Seen()
    spec = _hard({**base_spec, "accumFreq": 2, "batchSize": 8, "epochs": 2}, margin=0.1)
    summary, resolved = run_training(spec, reporters=[seen])
    counts = summary["hardNegatives"]
    assert counts["mined"] > 0 and counts["epoch"] == 0 and counts["queries"] > 0
    assert seen.mined == [counts]
    events = h.read_jsonl(tmp_path / "out" / "progress.jsonl")
    assert [e for e in events if e["event"] == "hardNegatives"][0]["mined"] == counts["mined"]
    assert "Hard negatives" in (tmp_path / "out" / "report.html").read_text()
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["hardNegatives"] == counts
    assert np.isfinite(summary["finalLoss"])
    # The negatives reach the loss: the first step (same model, same rows) has more columns to outrank.
    plain = {k: v for k, v in spec.items() if k != "hardNegatives"}
    run_training({**plain, "output": str(tmp_path / "plain")}, max_epochs=1)
    first = lambda out: next(e["loss"] for e in h.read_jsonl(out / "progress.jsonl") if e["event"] == "step")  # noqa: E731
    assert first(tmp_path / "out") > first(tmp_path / "plain")


def test_a_resumed_run_reads_its_mined_negatives_instead_of_mining_again(base_spec, run_training, h, tmp_path,
                                                                         monkeypatch):
    """Interrupted after epoch 1 and resumed, the run reads round 0 from the cache and ends
    with the uninterrupted run's weights; mining again would have used the moved model."""
    from kontrast.trainer.run import mining

    spec = _hard({**base_spec, "evalData": None, "epochs": 2, "batchSize": 8})
    spec.pop("evalData")
    whole, _ = run_training({**spec, "output": str(tmp_path / "whole")})
    run_training({**spec, "output": str(tmp_path / "cut")}, max_epochs=1)
    cached = list((tmp_path / "cut" / "hard_negatives").iterdir())
    assert len(cached) == 1 and cached[0].name.endswith("-r0.npz")

    def refuse(*a, **k):
        raise AssertionError("mined again instead of reading the cache")

    monkeypatch.setattr(mining, "mine", refuse)
    resumed, _ = run_training({**spec, "output": str(tmp_path / "cut")})
    assert resumed["hardNegatives"] == whole["hardNegatives"]
    assert resumed["finalLoss"] == pytest.approx(whole["finalLoss"], rel=1e-5)
    final = lambda out: torch.load(out / "checkpoints" / "epoch_2.pt", weights_only=True)["state_dict"]  # noqa: E731
    assert h.state_close(final(tmp_path / "whole"), final(tmp_path / "cut"))


def test_mining_never_picks_a_known_positive_and_the_margin_drops_more_as_it_grows(base_spec, resolve_spec):
    """The mining pass on the tiny model over trainData: no chosen document is a positive of
    its query (a row of weight above 0), and a larger margin drops more."""
    from kontrast.trainer.distributed import World
    from kontrast.trainer.mining.mine import mine, train_candidates
    from kontrast.trainer.run.setup import setup

    resolved = resolve_spec(_hard(base_spec, perQuery=3))
    run = setup(resolved, World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    ex = run.mining.dataset.ex
    candidates = train_candidates(ex)
    kw = dict(per_query=3, epoch=0, batch_size=16, device=torch.device("cpu"), precision=run.precision)
    results = {m: mine(run.net, run.mining.dataset.rows, run.mining.candidates_eval, candidates, margin=m, **kw)
               for m in (0.0, 0.3, 0.9)}
    positives = {(int(q), int(d)) for q, d, w in zip(ex.left_ids, ex.right_ids, ex.weights) if w > 0}
    for mined in results.values():
        for q, ids in zip(mined.query_ids, mined.ids):
            assert not any((int(q), int(d)) in positives for d in ids if d >= 0)
    assert results[0.0].mined > 0
    assert results[0.0].dropped <= results[0.3].dropped <= results[0.9].dropped
    assert results[0.9].dropped > results[0.0].dropped


def test_every_epochs_mines_again_with_the_trained_model_and_restarts_the_workers(base_spec, run_training, h,
                                                                                   tmp_path):
    spec = _hard({**base_spec, "epochs": 2, "workers": 1}, everyEpochs=1)
    summary, _ = run_training(spec)
    rounds = [e for e in h.read_jsonl(tmp_path / "out" / "progress.jsonl") if e["event"] == "hardNegatives"]
    assert [r["epoch"] for r in rounds] == [0, 1] and summary["hardNegatives"]["epoch"] == 1
    assert sorted(p.name.rsplit("-", 1)[1] for p in (tmp_path / "out" / "hard_negatives").iterdir()) == [
        "r0.npz", "r1.npz"]


def test_corpus_candidates_share_the_table_identities(base_spec, resolve_spec, small_data, h, tmp_path):
    """from: corpus: a corpus document that trainData has gets trainData's identity (so a known
    positive is never mined from the corpus), one it lacks an identity above all of trainData's."""
    import csv

    from kontrast.trainer.distributed import World
    from kontrast.trainer.mining.mine import corpus_candidates, mine
    from kontrast.trainer.run.setup import setup

    docs = {}
    for name in ("train.csv", "eval.csv"):
        with open(small_data / name, newline="") as f:
            for row in csv.DictReader(f):
                docs[(row["image"], row["title"])] = None
    # absolute image paths: an image's identity is its resolved location
    corpus = h.write_csv(tmp_path / "corpus.csv", [["image", "title"]] + [[str(small_data / i), t] for i, t in docs])
    resolved = resolve_spec(_hard({**base_spec, "corpusData": str(corpus)}, **{"from": "corpus", "perQuery": 3}))
    run = setup(resolved, World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    train = run.mining.dataset.ex
    candidates = run.mining.candidates
    assert len(candidates.ids) == len(docs) and len(set(candidates.ids.tolist())) == len(docs)
    in_train = np.isin(candidates.ids, train.right_ids)
    assert in_train.sum() == len(np.unique(train.right_ids))
    assert candidates.ids[~in_train].min() > train.right_ids.max()
    assert (candidates.ids == corpus_candidates(train, run.mining.candidates_eval.ex).ids).all()
    mined = mine(run.net, run.mining.dataset.rows, run.mining.candidates_eval, candidates, per_query=3, margin=0.0,
                 epoch=0, batch_size=16, device=torch.device("cpu"), precision=run.precision)
    positives = {(int(q), int(d)) for q, d, w in zip(train.left_ids, train.right_ids, train.weights) if w > 0}
    assert mined.mined > 0
    for q, ids in zip(mined.query_ids, mined.ids):
        assert not any((int(q), int(d)) in positives for d in ids if d >= 0)


def test_the_mining_model_is_a_checkpoint_when_named_and_the_start_model_after_a_resume(base_spec, run_training,
                                                                                       resolve_spec, tmp_path):
    """model: <checkpoint> loads its weights into a fresh copy; model: start once training has
    moved the run's model (a resume without the cache) rebuilds the starting weights."""
    from kontrast.trainer.distributed import World
    from kontrast.trainer.run.mining import _mining_model
    from kontrast.trainer.run.setup import setup
    from kontrast.trainer.run.state import Progress

    spec = {k: v for k, v in base_spec.items() if k != "evalData"}
    run_training({**spec, "epochs": 1, "output": str(tmp_path / "earlier")})
    earlier = tmp_path / "earlier" / "checkpoints" / "epoch_1.pt"
    saved = torch.load(earlier, weights_only=True)["state_dict"]
    world = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

    run = setup(resolve_spec(_hard(spec, model=str(earlier))), world)
    model = _mining_model(run, Progress(), 0)
    assert model is not run.net
    assert all(torch.equal(model.clip.state_dict()[k], v) for k, v in saved.items())

    run = setup(resolve_spec(_hard(spec)), world)
    start = {k: v.clone() for k, v in run.clip.state_dict().items()}
    assert _mining_model(run, Progress(), 0) is run.net          # not moved yet: the run's own model
    with torch.no_grad():
        for p in run.clip.parameters():
            p.add_(1.0)                                        # as if trained and resumed
    rebuilt = _mining_model(run, Progress(step=3), 0)
    assert all(torch.equal(rebuilt.clip.state_dict()[k], v) for k, v in start.items())
    assert _mining_model(run, Progress(step=3), 1) is run.net    # later rounds: the trained model
