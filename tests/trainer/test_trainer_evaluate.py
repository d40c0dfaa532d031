"""Evaluation against a corpus (corpusData): eval rows find their documents in the corpus by
identity, the corpus's documents are the candidates, and its errors name file, row and column.

The model tests use the real tiny open_clip model on the CPU, through ``kontrast evaluate``'s
own code (``evaluate_trainjob``), in one process and under torchrun with 2 gloo processes.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from kontrast.trainer.data.examples import load_examples, parse_examples
from kontrast.trainer.data.read import parse_table
from kontrast.trainer.errors import DataError
from kontrast.trainer.evaluation.job import evaluate_trainjob
from kontrast.trainer.evaluation.eval_set import build_eval_set
from kontrast.trainer.evaluation.metrics import Qrels, ranking_metrics
from kontrast.trainer.data.columns import Columns
from specs import params_of

SPEC = {"leftKeys": ["q"], "leftWeights": [1], "rightKeys": ["img", "t"], "rightWeights": [1, 1], "weightKey": "w"}
EVAL = "q,img,t,w\nred,/a.png,A,3\nred,/b.png,B,1\nblue,/c.png,C,2\nblue,/z.png,Z,0\n"


def eval_set_of(eval_text: str, corpus_text: str, spec=SPEC):
    params = params_of(spec)
    examples = parse_examples(parse_table("/e.csv", eval_text), params, require_positive_weight=False)
    corpus = parse_examples(parse_table("/corpus.csv", corpus_text), params, columns=Columns.corpus_of(params))
    return build_eval_set(examples, corpus=corpus)


def pairs(es) -> list[tuple[int, int, float]]:
    return list(zip(es.qrels.query.tolist(), es.qrels.doc.tolist(), es.qrels.grade.tolist()))


def test_candidates_are_the_corpus_documents_deduplicated_by_identity():
    # /a.png twice is one document; /x.png is a distractor; /z.png (grade 0) need not be there.
    es = eval_set_of(EVAL, "img,t\n/x.png,X\n/c.png,C\n/a.png,A\n/a.png,A\n/b.png,B\n")
    assert es.doc_file == "/corpus.csv"
    assert es.doc_rows.tolist() == [0, 1, 2, 4]          # corpus rows, first of each document
    assert es.query_rows.tolist() == [0, 2]
    assert pairs(es) == [(0, 2, 3.0), (0, 3, 1.0), (1, 1, 2.0)]


def test_document_ids_join_eval_rows_to_corpus_rows():
    spec = {**SPEC, "docIdKey": "id"}
    eval_text = "q,img,t,w,id\nred,/a.png,A,3,p1\nblue,/b.png,B,2,p2\n"
    # the same ids with other images and titles: identity is the id alone
    es = eval_set_of(eval_text, "img,t,id\n/other.png,Other,p2\n/x.png,X,p0\n/new.png,New,p1\n/y.png,Y,p1\n",
                     spec)
    assert es.doc_rows.tolist() == [0, 1, 2]
    assert pairs(es) == [(0, 2, 3.0), (1, 0, 2.0)]


def test_a_relevant_document_missing_from_the_corpus_names_the_row_and_the_corpus():
    with pytest.raises(DataError) as err:
        eval_set_of(EVAL, "img,t\n/a.png,A\n/c.png,C\n/b.png,other title\n")
    message = str(err.value)
    assert "/e.csv, row 2" in message and "/corpus.csv" in message, message
    assert "img '/b.png', t 'B'" in message and "row 1" not in message
    with pytest.raises(DataError) as err:
        eval_set_of("q,img,t,w,id\nred,/a.png,A,3,p1\nblue,/b.png,B,2,p9\n", "img,t,id\n/a.png,A,p1\n",
                    {**SPEC, "docIdKey": "id"})
    assert "/e.csv, row 2, column 'id'" in str(err.value) and "id 'p9'" in str(err.value)


def test_a_document_skipped_for_a_bad_image_drops_its_eval_rows(caplog):
    """Under data.onBadImage: skip the corpus rows of a bad image are dropped (``without``); the
    document is in the corpus file, so its eval rows leave the evaluation instead of failing it."""
    params = params_of(SPEC)
    examples = parse_examples(parse_table("/e.csv", EVAL), params, require_positive_weight=False)
    corpus = parse_examples(parse_table("/corpus.csv", "img,t\n/a.png,A\n/b.png,B\n/c.png,C\n"), params,
                            columns=Columns.corpus_of(params)).without([1])
    es = build_eval_set(examples, corpus=corpus)
    assert es.doc_rows.tolist() == [0, 1]                 # positions of the kept rows (/a.png, /c.png)
    assert pairs(es) == [(0, 0, 3.0), (1, 1, 2.0)]
    assert "1 relevant row(s) dropped" in caplog.text


def test_a_missing_corpus_column_names_the_column_and_the_file():
    with pytest.raises(DataError) as err:
        eval_set_of(EVAL, "img,title\n/a.png,A\n")
    assert "/corpus.csv, row 0 (line 1), column 't': column not found (named by spec.rightKeys[1])" in str(err.value)


def test_a_json_lines_corpus(tmp_path):
    """Marqtune's documents.jsonl form (here gzip-compressed): one object per line, keys as columns."""
    params = params_of({**SPEC, "docIdKey": "id"})
    lines = [{"id": 1, "img": "a.png", "t": "A"}, {"id": 2, "img": "b.png"}, {"id": 7, "img": "c.png", "t": "C"}]
    with gzip.open(tmp_path / "documents.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines)
    corpus = load_examples(str(tmp_path / "documents.jsonl.gz"), params, cache=str(tmp_path / "cache"),
                           columns=Columns.corpus_of(params))
    assert len(corpus) == 3 and corpus.right_texts(1) == [""]           # a key absent from a line is empty
    assert corpus.image(0) == str(tmp_path / "a.png")                   # relative to the corpus's folder
    # numeric ids in JSON join the same ids written in a CSV
    examples = parse_examples(parse_table("/e.csv", "q,img,t,w,id\nred,/a.png,A,3,7\nblue,/b.png,B,2,2\n"),
                              params)
    assert pairs(build_eval_set(examples, corpus=corpus)) == [(0, 2, 3.0), (1, 1, 2.0)]


# --------------------------------------------------------------------------------------------
# the real tiny model

@pytest.fixture
def twin_files(small_data, tmp_path):
    """The small eval file with a document id (``sku``) and a corpus in another folder that holds
    a twin of every eval document (same image and title, another sku) before the document itself."""
    with open(small_data / "eval.csv", newline="") as f:
        header, *body = list(csv.reader(f))
    rows = [[q, str(small_data / img), t, s, Path(img).stem] for q, img, t, s in body]
    eval_path = tmp_path / "eval" / "eval.csv"
    eval_path.parent.mkdir()
    with open(eval_path, "w", newline="") as f:
        csv.writer(f).writerows([header + ["sku"], *rows])
    documents = list({r[4]: (r[1], r[2]) for r in rows}.items())          # in order of first appearance
    corpus = tmp_path / "catalogue" / "corpus.csv"
    corpus.parent.mkdir()
    with open(corpus, "w", newline="") as f:
        csv.writer(f).writerows([["image", "title", "sku"],
                                 *[[img, title, f"twin-{sku}"] for sku, (img, title) in documents],
                                 *[[img, title, sku] for sku, (img, title) in documents]])
    return {"eval": eval_path, "corpus": corpus, "documents": len(documents)}


def test_a_twin_of_every_document_pushes_each_one_rank_down(base_spec, twin_files, resolve_spec, tmp_path,
                                                           monkeypatch):
    """Every twin embeds exactly like its document (encoded one at a time) and comes first in the
    corpus, so it wins the tie: each eval-only ranking d1, d2, ... becomes twin(d1), d1, twin(d2),
    d2, ...; e.g. a query whose first relevant document was at rank r has MRR 1/(2r) instead of 1/r."""
    import kontrast.trainer.evaluation.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "EVAL_BATCH", 1)
    spec = {**base_spec, "evalData": str(twin_files["eval"]), "docIdKey": "sku"}
    alone = evaluate_trainjob(resolve_spec(spec), device="cpu", top_k_file=str(tmp_path / "alone.npz"))
    ranked = evaluate_trainjob(resolve_spec({**spec, "corpusData": str(twin_files["corpus"])}), device="cpu",
                               top_k_file=str(tmp_path / "corpus.npz"))
    a, c = np.load(tmp_path / "alone.npz"), np.load(tmp_path / "corpus.npz")
    n = twin_files["documents"]
    assert len(a["doc_rows"]) == n and len(c["doc_rows"]) == 2 * n and str(c["doc_file"]) == str(twin_files["corpus"])
    assert c["doc_rows"].tolist() == list(range(2 * n))
    expected = np.full_like(c["top_docs"], -1)
    for q, top in enumerate(a["top_docs"]):
        order = [x for d in top[top >= 0] for x in (d, n + d)][: expected.shape[1]]   # twin j, document n + j
        expected[q, :len(order)] = order
    assert np.array_equal(c["top_docs"], expected)

    # The metrics are those of that ranking, and lower.
    examples = load_examples(str(twin_files["eval"]), resolve_spec(spec).params, require_positive_weight=False)
    q0 = build_eval_set(examples).qrels
    shifted = Qrels(q0.query, q0.doc + n, q0.grade, q0.n_queries, 2 * n)
    hand = ranking_metrics(expected, shifted)
    assert all(ranked["metrics"][k] == pytest.approx(hand[k], rel=1e-9) for k in hand)
    relevant = set(zip(q0.query.tolist(), q0.doc.tolist()))
    first = np.array([next(r for r, d in enumerate(top.tolist(), 1) if (q, d) in relevant)
                      for q, top in enumerate(a["top_docs"])])            # every query has one (eval file)
    assert alone["metrics"]["mrr@10"] == pytest.approx(np.mean(np.where(first <= 10, 1 / first, 0)), rel=1e-9)
    assert ranked["metrics"]["mrr@10"] == pytest.approx(np.mean(np.where(2 * first <= 10, 1 / (2 * first), 0)),
                                                        rel=1e-9)
    for key in ("ndcg@10", "mrr@10", "p@10", "map", "err@10"):
        assert ranked["metrics"][key] < alone["metrics"][key], key
    assert ranked["metrics"]["recall@100"] == alone["metrics"]["recall@100"] == 1.0


def test_a_relevant_document_missing_from_the_corpus_fails_kontrast_evaluate_with_78(base_spec, twin_files,
                                                                                   tmp_path, h, capsys):
    from kontrast.contract import EXIT_PERMANENT
    from kontrast.trainer.cli.evaluate import main

    with open(twin_files["corpus"], newline="") as f:
        header, *rows = list(csv.reader(f))
    gone = rows[-1]                                        # the last document (its twin stays)
    partial = tmp_path / "partial.csv"
    h.write_csv(partial, [header, *rows[:-1]])
    spec = {**base_spec, "evalData": str(twin_files["eval"]), "docIdKey": "sku", "corpusData": str(partial)}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(h.trainjob(spec)))
    assert main([str(job), "--device", "cpu"]) == EXIT_PERMANENT
    err = capsys.readouterr().err
    assert f"{twin_files['eval']}, row " in err and f"sku {gone[2]!r}" in err and str(partial) in err, err


def test_training_evaluates_against_the_corpus_before_during_and_after(run_training, resolve_spec, base_spec,
                                                                      small_data, tmp_path, h):
    """A corpus of the eval documents plus the training file's as distractors: the run's
    evaluations rank all of them, and ``kontrast evaluate`` on its checkpoint agrees."""
    with open(small_data / "eval.csv", newline="") as f:
        header, *ev = list(csv.reader(f))
    with open(small_data / "train.csv", newline="") as f:
        _, *tr = list(csv.reader(f))
    corpus = h.write_csv(tmp_path / "corpus" / "docs.csv",
                         [["image", "title"], *[[str(small_data / img), t] for _, img, t, _ in tr + ev]])
    spec = {**base_spec, "corpusData": str(corpus), "epochs": 2, "evalEvery": 1}
    summary, r = run_training(spec)
    assert [(e["epoch"], e["phase"]) for e in summary["evalHistory"]] == [(0, "before"), (1, "epoch"), (2, "after")]
    after = evaluate_trainjob(r, checkpoint=summary["checkpoints"][-1]["uri"], device="cpu")
    assert after["corpusData"] == str(corpus)
    assert all(after["metrics"][k] == pytest.approx(summary["eval"]["after"][k], rel=1e-6) for k in after["metrics"])
    start = next(e for e in h.read_jsonl(Path(r.params.output) / "progress.jsonl") if e["event"] == "start")
    assert start["rows"]["corpusRows"] == len(tr) + len(ev)
    # Distractors can only push relevant documents down: no metric is higher than the eval file's own.
    alone = evaluate_trainjob(resolve_spec({**base_spec, "epochs": 2, "evalEvery": 1}),
                              checkpoint=summary["checkpoints"][-1]["uri"], device="cpu")["metrics"]
    assert after["metrics"]["queries"] == alone["queries"]
    assert all(after["metrics"][k] <= alone[k] + 1e-12 for k in ("ndcg@10", "mrr@10", "recall@10", "map"))
    assert after["metrics"]["ndcg@10"] < alone["ndcg@10"]


@pytest.mark.distributed
@pytest.mark.parametrize("widths", [{}, {"matryoshkaDims": [8, 4]}], ids=["full", "matryoshka"])
def test_two_processes_evaluate_a_corpus_like_one(base_spec, twin_files, resolve_spec, tmp_path, h, widths):
    """``kontrast evaluate`` under torchrun: each process encodes half the corpus and searches it;
    the merged metrics equal one process's (with Matryoshka widths, at each width too)."""
    spec = {**base_spec, "evalData": str(twin_files["eval"]), "docIdKey": "sku",
            "corpusData": str(twin_files["corpus"]), **widths}
    one = evaluate_trainjob(resolve_spec(spec), device="cpu")["metrics"]
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(h.trainjob(spec)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "kontrast.trainer.cli.evaluate", str(job), "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    two = json.loads(proc.stdout[proc.stdout.index("{"):])["metrics"]
    assert two.keys() == one.keys()
    assert ("ndcg@10@dim4" in one) == bool(widths)
    values = np.array([one[k] for k in one])
    assert np.linalg.norm(np.array([two[k] for k in one]) - values) / np.linalg.norm(values) < 1e-6
