"""``kontrast split``: GCL's evaluation splits of one table, by query and document identity,
without leakage."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from kontrast.cli import main
from kontrast.split import SPLITS, split_table


def table(n_queries: int = 40, n_docs: int = 30) -> list[dict[str, str]]:
    """Each query with five documents, each document answering several queries."""
    return [{"query": f"q{q}", "doc": f"d{(q * 7 + k * 3) % n_docs}", "score": str(1 + k % 3)}
            for q in range(n_queries) for k in range(5)]


def ids(rows, key):
    return {row[key] for row in rows}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_row_lands_once_and_nothing_leaks(seed):
    rows = table()
    parts = split_table(rows, ["query"], ["doc"], fraction=0.2, seed=seed)
    assert sorted(i for s in SPLITS for i in map(rows.index, parts[s])) == list(range(len(rows)))
    assert all(parts[s] for s in SPLITS), {s: len(parts[s]) for s in SPLITS}
    train = parts["train"]
    seen_q, seen_d = ids(train, "query"), ids(train, "doc")
    pairs = {(r["query"], r["doc"]) for r in train}
    # Held-out queries and documents never reach train; eval pairs are never train pairs.
    assert ids(parts["eval_novel_queries"], "query").isdisjoint(seen_q)
    assert ids(parts["eval_zero_shot"], "query").isdisjoint(seen_q)
    assert ids(parts["eval_novel_documents"], "doc").isdisjoint(seen_d)
    assert ids(parts["eval_zero_shot"], "doc").isdisjoint(seen_d)
    # What each split keeps seen is seen.
    assert ids(parts["eval_novel_queries"], "doc") <= seen_d
    assert ids(parts["eval_novel_documents"], "query") <= seen_q
    assert ids(parts["eval_in_domain"], "query") <= seen_q and ids(parts["eval_in_domain"], "doc") <= seen_d
    for s in SPLITS[1:]:
        assert pairs.isdisjoint((r["query"], r["doc"]) for r in parts[s]), s


def test_the_split_is_a_seeded_draw():
    rows = table()
    assert split_table(rows, ["query"], ["doc"], seed=3) == split_table(rows, ["query"], ["doc"], seed=3)
    assert split_table(rows, ["query"], ["doc"], seed=3) != split_table(rows, ["query"], ["doc"], seed=4)


def test_identity_is_every_named_column():
    """Two rows with the same image but another title are two documents."""
    rows = [{"query": f"q{q}", "image": f"i{d % 4}", "title": f"t{d}", "score": "1"}
            for q in range(20) for d in range(q % 5, q % 5 + 6)]
    parts = split_table(rows, ["query"], ["image", "title"], fraction=0.25, seed=0)
    seen = {(r["image"], r["title"]) for r in parts["train"]}
    assert {(r["image"], r["title"]) for r in parts["eval_novel_documents"]}.isdisjoint(seen)
    assert {r["image"] for r in parts["eval_novel_documents"]} & {r["image"] for r in parts["train"]}


def test_the_command_writes_one_csv_per_split(tmp_path, capsys):
    data = tmp_path / "all.csv"
    rows = table()
    with open(data, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["query", "doc", "score"])
        writer.writeheader()
        writer.writerows(rows)
    assert main(["split", str(data), str(tmp_path / "out"), "--doc-keys", "doc", "--seed", "1"]) == 0
    written = {s: list(csv.DictReader(open(tmp_path / "out" / f"{s}.csv", newline=""))) for s in SPLITS}
    assert written == split_table(rows, ["query"], ["doc"], seed=1)
    assert "eval_zero_shot.csv" in capsys.readouterr().out
    assert main(["split", str(data), str(tmp_path / "bad"), "--doc-keys", "image"]) == 1
    assert "no column image" in capsys.readouterr().err
    assert not Path(tmp_path / "bad").exists()
