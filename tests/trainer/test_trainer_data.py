"""Data tables and their errors: every message names the file, the row and the column, for
CSV, TSV and Parquet alike; the checked table is shared by the processes of a node."""

from __future__ import annotations

import csv
import io
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import spawned
import torch

from kontrast.trainer.data.dataset import PairDataset, sample_seed
from kontrast.trainer.data.load import load_data
from kontrast.trainer.errors import DataError
from kontrast.trainer.data.examples import load_examples, parse_examples
from kontrast.trainer.data.read import parse_table
from specs import params_of

SPEC = {"leftKeys": ["query"], "leftWeights": [1.0], "rightKeys": ["image", "title"],
        "rightWeights": [0.75, 0.25], "weightKey": "score"}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KONTRAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write(folder, text: str, fmt: str):
    """The same table as a CSV file, or as Parquet (every column text, as a warehouse exports it)."""
    if fmt == "csv":
        path = folder / "train.csv"
        path.write_text(text, encoding="utf-8")
        return path
    rows = list(csv.reader(io.StringIO(text, newline="")))
    header, body = rows[0], [r for r in rows[1:] if r]
    path = folder / "train.parquet"
    pq.write_table(pa.table({h: [r[i] for r in body] for i, h in enumerate(header)}), path)
    return path


@pytest.fixture(params=["csv", "parquet"])
def load(request, tmp_path):
    """text -> Examples, through a file of the parametrised format."""
    def _load(text: str, spec=SPEC, **kw):
        return load_examples(str(write(tmp_path, text, request.param)), params_of(spec), **kw)

    _load.fmt = request.param
    return _load


def error_of(load, text: str, spec=SPEC, **kw) -> DataError:
    with pytest.raises(DataError) as info:
        load(text, spec, **kw)
    return info.value


def test_missing_column_names_file_column_and_spec_field(load):
    err = error_of(load, "query,image,score\nred mug,a.png,1\n")
    assert (err.row, err.column) == (0, "title") and err.file.endswith(f"train.{load.fmt}")
    assert "spec.rightKeys[1]" in str(err) and "'query', 'image', 'score'" in str(err)
    assert ", row 0" in str(err) and "column 'title'" in str(err)


def test_missing_weight_column(load):
    err = error_of(load, "query,image,title\nred mug,a.png,t\n")
    assert err.column == "score" and "spec.weightKey" in str(err)


@pytest.mark.parametrize("value, words", [
    ("abc", "not a number"), ("-1", "negative"), ("nan", "not a finite"), ("inf", "not a finite"),
    ("", "empty"),
])
def test_bad_weights(load, value, words):
    err = error_of(load, f"query,image,title,score\nred mug,a.png,t,1\nblue mug,b.png,t,{value}\n")
    assert (err.row, err.column) == (2, "score")
    assert words in str(err) and "row 2" in str(err)


@pytest.mark.parametrize("value, words", [(float("nan"), "not a finite"), (-1.0, "negative"), (None, "empty")])
def test_bad_numeric_weights_in_parquet(tmp_path, value, words):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"query": ["a", "b"], "image": ["a.png", "b.png"], "title": ["t", "t"],
                             "score": pa.array([1.0, value], pa.float64())}), path)
    with pytest.raises(DataError, match=words) as info:
        load_examples(str(path), params_of(SPEC))
    assert (info.value.row, info.value.column) == (2, "score")


def test_zero_weight_is_allowed_but_not_everywhere(load):
    ex = load("query,image,title,score\nred mug,a.png,t,0\nblue mug,b.png,t,2\n")
    assert ex.weights.tolist() == [0.0, 2.0]
    err = error_of(load, "query,image,title,score\nred mug,a.png,t,0\n")
    assert "every row has weight 0" in str(err)
    # eval files may hold only irrelevant pairs in some rows, and that is fine
    assert load("query,image,title,score\nred mug,a.png,t,0\n", require_positive_weight=False).weights[0] == 0


def test_row_empty_on_a_whole_side(load):
    err = error_of(load, "query,image,title,score\nred mug,a.png,t,1\n  ,b.png,t,1\n")
    assert (err.row, err.column) == (2, "query") and "whole left side" in str(err)
    err = error_of(load, "query,image,title,score\nred mug,,,1\n")
    assert err.row == 1 and "whole right side" in str(err) and "['image', 'title']" in str(err)


def test_empty_side_counts_only_fields_with_weight(load):
    # title has weight 0 in the table: a row with only a title is empty on the right side
    err = error_of(load, "query,image,title,score\nred mug,,a title,1\n", {**SPEC, "rightWeights": [1.0, 0.0]})
    assert err.column == "image" and "whole right side" in str(err)


def test_several_problems_are_reported_together(load):
    err = error_of(load, "query,image,title,score\nq,a.png,t,x\nq,a.png,t,-2\n,a.png,t,1\n")
    assert [p.row for p in err.problems] == [1, 2, 3]
    assert str(err).startswith("3 problems in the data:")


def test_problems_past_the_limit_are_counted(load):
    err = error_of(load, "query,image,title,score\n" + "q,a.png,t,x\n" * 25)
    assert len(err.problems) == 20 and err.truncated == 5 and "and 5 more problem(s)" in str(err)


def test_missing_field_gets_weight_zero_and_row_is_renormalised(load):
    spec = {**SPEC, "leftKeys": ["query", "category"], "leftWeights": [3.0, 1.0]}
    ex = load("query,category,image,title,score\n"
              "red mug,mugs,a.png,red mug t,1\n"
              "red mug,,a.png,,1\n"
              ",mugs,,red mug t,1\n", spec)
    np.testing.assert_allclose(ex.left_weights, [[0.75, 0.25], [1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(ex.right_weights, [[0.75, 0.25], [1.0, 0.0], [0.0, 1.0]])
    assert ex.image(2) is None and ex.left_texts(2) == ["", "mugs"]


def test_ids_number_distinct_queries_and_documents(load):
    ex = load("query,image,title,score\n"
              "red mug,a.png,t1,3\nred mug,b.png,t2,1\nblue mug,a.png,t1,2\nred mug,a.png,t1,1\n")
    assert ex.left_ids.tolist() == [0, 0, 1, 0]
    assert ex.right_ids.tolist() == [0, 1, 0, 0]


def test_ids_ignore_fields_of_weight_zero(load):
    # the title has weight 0: two rows with the same image are one document, whatever the title
    text = "query,cat,image,title,score\nred mug,a,a.png,t1,3\nred mug,b,a.png,t2,1\n"
    spec = {**SPEC, "leftKeys": ["query", "cat"], "leftWeights": [1.0, 0.0], "rightWeights": [1.0, 0.0]}
    ex = load(text, spec)
    assert ex.left_ids.tolist() == [0, 0] and ex.right_ids.tolist() == [0, 0]
    ex = load(text, {**spec, "rightWeights": [1.0, 0.5]})
    assert ex.right_ids.tolist() == [0, 1]


def test_id_columns_identify_queries_and_documents(load):
    text = "qid,query,doc,image,title,score\n1,red mug,d1,a.png,t1,3\n1,a red mug,d2,a.png,t1,1\n2,red mug,d1,b.png,x,1\n"
    ex = load(text, {**SPEC, "queryIdKey": "qid", "docIdKey": "doc"})
    assert ex.left_ids.tolist() == [0, 0, 1] and ex.right_ids.tolist() == [0, 1, 0]
    err = error_of(load, text, {**SPEC, "docIdKey": "sku"})
    assert err.column == "sku" and "spec.docIdKey" in str(err)


def test_image_paths_resolve_against_the_data_folder():
    ex = parse_examples(parse_table("/data/sub/train.csv", "query,image,title,score\nq,img/a.png,t,1\n"
                                    "q,/abs/b.png,t,1\nq,s3://bucket/c.png,t,1\nq,file:///x/d.png,t,1\n"), params_of(SPEC))
    assert [ex.image(i) for i in range(4)] == ["/data/sub/img/a.png", "/abs/b.png", "s3://bucket/c.png", "/x/d.png"]
    ex = parse_examples(parse_table("s3://bucket/set/train.csv", "query,image,title,score\nq,img/a.png,t,1\n"
                                    "q,/top.png,t,1\n"), params_of(SPEC))
    assert [ex.image(i) for i in range(2)] == ["s3://bucket/set/img/a.png", "s3://bucket/top.png"]


def test_row_and_line_numbers_with_a_multiline_field(tmp_path):
    path = write(tmp_path, 'query,image,title,score\nq,a.png,"two\nlines",1\n\nq,a.png,t,bad\n', "csv")
    with pytest.raises(DataError) as info:
        load_examples(str(path), params_of(SPEC))
    assert (info.value.row, info.value.problems[0].line) == (2, 5) and "row 2 (line 5)" in str(info.value)
    ex = load_examples(str(write(tmp_path, 'query,image,title,score\nq,a.png,"two\nlines",1\n', "csv")), params_of(SPEC))
    assert ex.right_texts(0) == ["two\nlines"]


@pytest.mark.parametrize("row", ["q,a.png,t,1,extra", "q,a.png"])
def test_rows_with_the_wrong_number_of_fields(tmp_path, row):
    path = write(tmp_path, f"query,image,title,score\nq,a.png,t,1\n{row}\n", "csv")
    with pytest.raises(DataError, match=f"{len(row.split(','))} fields but the header has 4") as info:
        load_examples(str(path), params_of(SPEC))
    assert info.value.row == 2


def test_duplicate_column_bom_and_empty_files(tmp_path):
    path = write(tmp_path, "query,image,query,title,score\nq,a.png,q,t,1\n", "csv")
    with pytest.raises(DataError, match="names column 'query' twice"):
        load_examples(str(path), params_of(SPEC))
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffquery,image,title,score\nq,a.png,t,1\n".encode("utf-8"))
    assert load_examples(str(path), params_of(SPEC)).left_texts(0) == ["q"]
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="the file is empty"):
        load_examples(str(tmp_path / "empty.csv"), params_of(SPEC))
    (tmp_path / "header.csv").write_text("query,image,title,score\n")
    with pytest.raises(DataError, match="a header but no data rows"):
        load_examples(str(tmp_path / "header.csv"), params_of(SPEC))
    pq.write_table(pa.table({k: pa.array([], pa.string()) for k in ("query", "image", "title", "score")}),
                   tmp_path / "header.parquet")
    with pytest.raises(DataError, match="a header but no data rows"):
        load_examples(str(tmp_path / "header.parquet"), params_of(SPEC))
    with pytest.raises(DataError, match="file not found") as info:
        load_examples(str(tmp_path / "missing.csv"), params_of(SPEC))
    assert info.value.file.endswith("missing.csv")


def test_tsv_and_compressed_csv(tmp_path, h):
    path = h.write_csv(tmp_path / "d.tsv", [["query", "image", "title", "score"], ["red, mug", "a.png", "t", "1"]],
                       delimiter="\t")
    assert load_examples(str(path), params_of(SPEC)).left_texts(0) == ["red, mug"]
    import gzip

    (tmp_path / "d.csv.gz").write_bytes(gzip.compress(b"query,image,title,score\nq,a.png,t,2\n"))
    assert load_examples(str(tmp_path / "d.csv.gz"), params_of(SPEC)).weights.tolist() == [2.0]


def test_the_checked_table_is_built_once_and_memory_mapped(tmp_path, cache):
    path = write(tmp_path, "query,image,title,score\nq,a.png,t,1\n", "csv")
    a = load_examples(str(path), params_of(SPEC))
    files = list((cache / "tables").glob("*.arrow"))
    assert len(files) == 1 and a.path == str(files[0])
    mtime = files[0].stat().st_mtime_ns
    b = load_examples(str(path), params_of(SPEC))
    assert b.path == a.path and files[0].stat().st_mtime_ns == mtime   # mapped, not rebuilt
    assert not a.weights.flags.owndata   # a view of the mapped pages, not a copy
    path.write_text("query,image,title,score\nq,a.png,t,3\n")     # a changed file gets a new table
    assert load_examples(str(path), params_of(SPEC)).weights.tolist() == [3.0]


def test_a_killed_builders_temporary_file_is_removed_by_the_next_builder(tmp_path, cache):
    """A builder SIGKILLed mid-write leaves ``.KEY.arrow.*.tmp`` (as large as the table); the
    next process to take the lock removes it before building."""
    path = write(tmp_path, "query,image,title,score\nq,a.png,t,1\n", "csv")
    built = Path(load_examples(str(path), params_of(SPEC)).path)
    orphan = built.parent / f".{built.name}.k1ll3d.tmp"
    orphan.write_bytes(b"half a table")
    other = built.parent / ".0123456789abcdef.arrow.other.tmp"     # another table's: not ours to judge
    other.write_bytes(b"")
    built.unlink()
    assert load_examples(str(path), params_of(SPEC)).weights.tolist() == [1.0]
    assert not orphan.exists() and other.exists()


_CHILD = """
import sys, time
from kontrast.trainer.data.examples import load_examples
import kontrast.trainer.data.shared_table as table
real = table._build_in_child
def slow(*a, **k):
    print("built", flush=True)
    time.sleep(1.0)
    return real(*a, **k)
table._build_in_child = slow
table.IN_PROCESS_MAX_BYTES = 0   # the build in a child process, as for large files
from specs import params_of
ex = load_examples(sys.argv[1], params_of({"leftKeys": ["query"], "leftWeights": [1.0], "rightKeys": ["image", "title"],
                                           "rightWeights": [0.75, 0.25], "weightKey": "score"}))
print(ex.path, len(ex), flush=True)
"""


def test_large_files_are_checked_in_a_child_process_with_the_same_errors(tmp_path, monkeypatch):
    import kontrast.trainer.data.shared_table as table

    monkeypatch.setattr(table, "IN_PROCESS_MAX_BYTES", 0)
    path = write(tmp_path, "query,image,title,score\nq,a.png,t,1\nq,a.png,\"two\nlines\",x\n", "csv")
    with pytest.raises(DataError) as info:
        load_examples(str(path), params_of(SPEC))
    assert str(info.value).endswith("row 2 (line 4), column 'score': the weight 'x' is not a number")
    path = write(tmp_path, "query,image,title,score\nq,a.png,t,1\nr,a.png,t,2\n", "csv")
    assert load_examples(str(path), params_of(SPEC)).weights.tolist() == [1.0, 2.0]


def test_two_processes_share_one_table_file(tmp_path, cache):
    path = write(tmp_path, "query,image,title,score\n" + "q,a.png,t,1\n" * 50, "csv")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}   # tests/, for specs.py
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(path)], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(o.count("built") for o in outs) == 1           # one built it, the other waited and mapped it
    assert {o[-2] for o in outs} == {str(next((cache / "tables").glob("*.arrow")))}
    assert [o[-1] for o in outs] == ["50", "50"]


def test_examples_pickle_as_their_file(tmp_path):
    path = write(tmp_path, "query,image,title,score\nq,a.png,t,1\nr,b.png,t,2\n", "csv")
    ex = load_examples(str(path), params_of(SPEC))
    import pickle

    assert len(pickle.dumps(ex)) < 1000      # the path, not the data
    q = multiprocessing.get_context("spawn").Queue()
    p = multiprocessing.get_context("spawn").Process(target=spawned.read_row, args=(ex, 1, q))
    p.start()
    assert q.get(timeout=60) == (["r"], 2.0)
    p.join()


def test_dataset_items_are_uint8_and_seeded(tmp_path, h):
    from open_clip import SimpleTokenizer
    from torchvision import transforms

    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "a.png")
    rows = [["query", "image", "title", "score"], ["red mug", "a.png", "red mug", "2.5"], ["blue", "", "t", "1"]]
    spec = {**SPEC, "data": {"cache": str(tmp_path / "c")}}
    ex, report = load_data(str(h.write_csv(tmp_path / "t.csv", rows)), params_of(spec), require_positive_weight=True)
    assert report.checked == 1 and not report.bad
    ds = PairDataset(ex, transforms.Compose([transforms.RandomResizedCrop(8, scale=(0.5, 1.0)), transforms.ToTensor(),
                                             transforms.Normalize((0.5,) * 3, (0.25,) * 3)]),
                     SimpleTokenizer(context_length=6), image_size=8, seed=1)
    item = ds[0]
    assert item["left_tokens"].shape == (1, 6) and item["right_tokens"].shape == (1, 6)
    assert item["image"].shape == (3, 8, 8) and item["image"].dtype == torch.uint8 and float(item["weight"]) == 2.5
    assert (ds.mean, ds.std) == ((0.5,) * 3, (0.25,) * 3)
    assert torch.equal(ds[1]["image"], torch.zeros(3, 8, 8, dtype=torch.uint8))  # empty image cell: blank
    assert ds[1]["right_weights"].tolist() == [0.0, 1.0]
    # augmentation is seeded per (seed, epoch, sample): reproducible, new each epoch, and the
    # epoch may travel with the index (persistent workers never see set_epoch)
    assert torch.equal(ds[0]["image"], item["image"])
    assert not torch.equal(ds[(1, 0)]["image"], item["image"])
    ds.set_epoch(1)
    assert torch.equal(ds[0]["image"], ds[(1, 0)]["image"])
    # seeding the CPU generator alone is torch.manual_seed's crop, and leaves the caller's RNG be
    torch.manual_seed(123)
    before = torch.get_rng_state()
    crop = ds[(0, 0)]["image"]
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(sample_seed(1, 0, 0))
    assert torch.equal(ds.transform(Image.open(tmp_path / "a.png").convert("RGB")), crop)


def test_device_normalisation_equals_torchvision():
    from torchvision import transforms

    from kontrast.trainer.data.transforms import normalize_images

    images = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    mean, std = (0.48, 0.45, 0.40), (0.26, 0.26, 0.27)
    expected = transforms.Normalize(mean, std)(images.float() / 255)
    got = normalize_images(images, mean, std)
    assert float(torch.linalg.vector_norm(got - expected) / torch.linalg.vector_norm(expected)) < 1e-6


@pytest.mark.parametrize("base", ["/data/catalogue", "s3://bucket/catalogue"])
def test_image_cells_resolve_vectorised_as_join_location_does(base, monkeypatch):
    from kontrast.trainer.locations import join_location
    from kontrast.trainer.data.check import resolve_images

    monkeypatch.setenv("KONTRAST_PVC_ROOT", "/mnt/pvcs/")
    cells = ["a.jpg", "img/b.jpg", "/abs/c.jpg", "https://h/d.jpg", "s3://b/e.jpg", "pvc://data/img/f.jpg",
             "pvc://data", "pvc://data//g.jpg", "pvc://data/./h.jpg", "pvc:///data/i.jpg", "pvc://data/j/",
             "file:///x/k.jpg", "file://rel/l.jpg", "~/m.jpg", "", "pvc://data/img/f.jpg", "a.jpg"]
    got = resolve_images(pa.array(cells, pa.large_string()), base).to_pylist()
    assert got == [join_location(base, c) if c else "" for c in cells]
