"""Retrieval metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kontrast.trainer.data import parse_examples, parse_table
from kontrast.trainer.evaluate import build_eval_set, ranking_metrics
from specs import params_of


def test_metrics_match_hand_computation():
    scores = np.array([[0.9, 0.8, 0.7, 0.1],     # ranks d0 d1 d2 d3
                       [0.2, 0.3, 0.9, 0.4],     # ranks d2 d3 d1 d0
                       [0.5, 0.4, 0.3, 0.2]])
    relevance = np.array([[0, 3, 0, 1],
                          [2, 0, 0, 0],
                          [0, 0, 0, 0]])         # no relevant document: left out of the means
    m = ranking_metrics(scores, relevance)
    ndcg1 = (3 / math.log2(3) + 1 / math.log2(5)) / (3 / math.log2(2) + 1 / math.log2(3))
    ndcg2 = (2 / math.log2(5)) / 2
    assert m["ndcg@10"] == pytest.approx((ndcg1 + ndcg2) / 2)
    assert m["mrr@10"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert m["recall@10"] == pytest.approx(1.0)
    assert m["map"] == pytest.approx(((1 / 2 + 2 / 4) / 2 + 1 / 4) / 2)
    assert m["queries"] == 2


def test_cutoff_at_ten():
    n = 12
    scores = -np.arange(n, dtype=float)[None, :]       # documents ranked in index order
    relevance = np.zeros((1, n))
    relevance[0, [3, 10]] = [1, 2]                      # ranks 4 and 11
    m = ranking_metrics(scores, relevance)
    assert m["mrr@10"] == pytest.approx(1 / 4)
    assert m["recall@10"] == pytest.approx(1 / 2)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(5)) / (2 + 1 / math.log2(3)))
    assert m["map"] == pytest.approx((1 / 4 + 2 / 11) / 2)
    relevance[0, 3] = 0                                  # only a rank-11 hit: nothing in the top 10
    m = ranking_metrics(scores, relevance)
    assert (m["mrr@10"], m["recall@10"], m["ndcg@10"]) == (0.0, 0.0, 0.0)


def test_ties_keep_document_order_and_perfect_ranking_scores_one():
    m = ranking_metrics(np.zeros((1, 3)), np.array([[1, 0, 0]]))
    assert m["mrr@10"] == 1.0 and m["map"] == 1.0 and m["ndcg@10"] == 1.0
    with pytest.raises(ValueError, match="no query has a relevant document"):
        ranking_metrics(np.zeros((1, 2)), np.zeros((1, 2)))


def test_eval_set_uses_distinct_queries_documents_and_graded_weights():
    spec = {"leftKeys": ["q"], "leftWeights": [1], "rightKeys": ["img", "t"], "rightWeights": [1, 1], "weightKey": "w"}
    text = "q,img,t,w\nred,/a.png,A,3\nred,/b.png,B,1\nblue,/a.png,A,0\nred,/a.png,A,2\nblue,/c.png,C,2\n"
    es = build_eval_set(parse_examples(parse_table("/e.csv", text), params_of(spec), require_positive_weight=False))
    assert es.query_rows == [0, 2] and es.doc_rows == [0, 1, 4]
    np.testing.assert_array_equal(es.relevance, [[3, 1, 0], [0, 0, 2]])   # duplicate pair: the higher weight
