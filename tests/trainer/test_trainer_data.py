"""Data parsing and its errors: every message names the file, the row and the column."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kontrast.trainer.data import (PairDataset, check_images, load_examples, parse_table, parse_examples,
                                   read_table)
from kontrast.trainer.errors import DataError
from specs import params_of

SPEC = {"leftKeys": ["query"], "leftWeights": [1.0], "rightKeys": ["image", "title"],
        "rightWeights": [0.75, 0.25], "weightKey": "score"}


def parse(text: str, spec=SPEC, file="/data/train.csv", **kw):
    return parse_examples(parse_table(file, text), params_of(spec), **kw)


def error_of(text: str, spec=SPEC, **kw) -> DataError:
    with pytest.raises(DataError) as info:
        parse(text, spec, **kw)
    return info.value


def test_missing_column_names_file_column_and_spec_field():
    err = error_of("query,image,score\nred mug,a.png,1\n")
    assert (err.file, err.row, err.column) == ("/data/train.csv", 0, "title")
    assert "spec.rightKeys[1]" in str(err) and "'query', 'image', 'score'" in str(err)
    assert str(err).startswith("/data/train.csv, row 0 (line 1), column 'title'")


def test_missing_weight_column():
    err = error_of("query,image,title\nred mug,a.png,t\n")
    assert err.column == "score" and "spec.weightKey" in str(err)


@pytest.mark.parametrize("value, words", [
    ("abc", "not a number"), ("-1", "negative"), ("nan", "not a finite"), ("inf", "not a finite"),
    ("", "empty"),
])
def test_bad_weights(value, words):
    err = error_of(f"query,image,title,score\nred mug,a.png,t,1\nblue mug,b.png,t,{value}\n")
    assert (err.row, err.column) == (2, "score")
    assert words in str(err) and "row 2 (line 3)" in str(err)


def test_zero_weight_is_allowed_but_not_everywhere():
    ex = parse("query,image,title,score\nred mug,a.png,t,0\nblue mug,b.png,t,2\n")
    assert ex.weights.tolist() == [0.0, 2.0]
    err = error_of("query,image,title,score\nred mug,a.png,t,0\n")
    assert "every row has weight 0" in str(err)
    # eval files may hold only irrelevant pairs in some rows, and that is fine
    assert parse("query,image,title,score\nred mug,a.png,t,0\n", require_positive_weight=False).weights[0] == 0


def test_row_empty_on_a_whole_side():
    err = error_of("query,image,title,score\nred mug,a.png,t,1\n  ,b.png,t,1\n")
    assert (err.row, err.column) == (2, "query") and "whole left side" in str(err)
    err = error_of("query,image,title,score\nred mug,,,1\n")
    assert err.row == 1 and "whole right side" in str(err) and "['image', 'title']" in str(err)


def test_empty_side_counts_only_fields_with_weight():
    # title has weight 0 in the table: a row with only a title is empty on the right side
    spec = {**SPEC, "rightWeights": [1.0, 0.0]}
    err = error_of("query,image,title,score\nred mug,,a title,1\n", spec)
    assert err.column == "image" and "whole right side" in str(err)


def test_several_problems_are_reported_together():
    err = error_of("query,image,title,score\nq,a.png,t,x\nq,a.png,t,-2\n,a.png,t,1\n")
    assert [p.row for p in err.problems] == [1, 2, 3]
    assert str(err).startswith("3 problems in the data:")


def test_missing_field_gets_weight_zero_and_row_is_renormalised():
    spec = {**SPEC, "leftKeys": ["query", "category"], "leftWeights": [3.0, 1.0]}
    ex = parse("query,category,image,title,score\n"
               "red mug,mugs,a.png,red mug t,1\n"
               "red mug,,a.png,,1\n"
               ",mugs,,red mug t,1\n", spec)
    np.testing.assert_allclose(ex.left_weights, [[0.75, 0.25], [1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(ex.right_weights, [[0.75, 0.25], [1.0, 0.0], [0.0, 1.0]])
    assert ex.images[2] is None


def test_ids_number_distinct_queries_and_documents():
    ex = parse("query,image,title,score\n"
               "red mug,a.png,t1,3\nred mug,b.png,t2,1\nblue mug,a.png,t1,2\nred mug,a.png,t1,1\n")
    assert ex.left_ids.tolist() == [0, 0, 1, 0]
    assert ex.right_ids.tolist() == [0, 1, 0, 0]


def test_image_paths_resolve_against_the_csv_folder():
    ex = parse("query,image,title,score\nq,img/a.png,t,1\nq,/abs/b.png,t,1\nq,s3://bucket/c.png,t,1\n"
               "q,file:///x/d.png,t,1\n", file="/data/sub/train.csv")
    assert ex.images == ["/data/sub/img/a.png", "/abs/b.png", "s3://bucket/c.png", "/x/d.png"]
    ex = parse("query,image,title,score\nq,img/a.png,t,1\n", file="s3://bucket/set/train.csv")
    assert ex.images == ["s3://bucket/set/img/a.png"]


def test_row_and_line_numbers_with_a_multiline_field():
    err = error_of('query,image,title,score\nq,a.png,"two\nlines",1\nq,a.png,t,bad\n')
    assert (err.row, err.problems[0].line) == (2, 4)


def test_too_many_fields():
    err = error_of("query,image,title,score\nq,a.png,t,1,extra\n")
    assert err.row == 1 and "5 fields but the header has 4" in str(err)


def test_tsv_and_file_errors(tmp_path, h):
    path = h.write_csv(tmp_path / "d.tsv", [["query", "image", "title", "score"], ["red, mug", "a.png", "t", "1"]],
                       delimiter="\t")
    ex = load_examples(str(path), params_of(SPEC))
    assert ex.left_texts == [["red, mug"]]
    with pytest.raises(DataError, match="file not found") as info:
        read_table(str(tmp_path / "missing.csv"))
    assert info.value.file.endswith("missing.csv")


def test_unreadable_and_missing_images_are_named(tmp_path, h):
    h.write_image(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    path = h.write_csv(tmp_path / "train.csv", [["query", "image", "title", "score"],
                                                ["a", "ok.png", "t", "1"], ["b", "broken.png", "t", "1"],
                                                ["c", "ok.png", "t", "1"], ["d", "gone.png", "t", "1"]])
    ex = load_examples(str(path), params_of(SPEC))
    with pytest.raises(DataError) as info:
        check_images(ex)
    err = info.value
    assert [(p.row, p.column) for p in err.problems] == [(2, "image"), (4, "image")]
    assert "broken.png" in str(err.problems[0]) and "file not found" in str(err.problems[1])
    assert str(path) in str(err)


def test_every_distinct_used_image_is_checked(tmp_path, h):
    for name in ("a", "b", "c"):
        h.write_image(tmp_path / f"{name}.png")
    rows = [["query", "image", "title", "score"], ["q", "a.png", "t", "1"], ["q", "b.png", "t", "1"],
            ["q", "a.png", "t", "1"], ["q", "c.png", "t", "1"]]
    ex = load_examples(str(h.write_csv(tmp_path / "t.csv", rows)), params_of(SPEC))
    seen = []
    assert check_images(ex, loader=lambda loc: seen.append(loc)) == 3
    assert sorted(seen) == [str(tmp_path / f"{n}.png") for n in "abc"]
    # image weight 0 in the table: images are never read, so none is checked
    ex = load_examples(str(tmp_path / "t.csv"), params_of({**SPEC, "rightWeights": [0.0, 1.0]}))
    assert check_images(ex, loader=lambda loc: seen.append(loc)) == 0


def test_dataset_items(tmp_path, h):
    from open_clip import SimpleTokenizer
    from torchvision import transforms

    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "a.png")
    rows = [["query", "image", "title", "score"], ["red mug", "a.png", "red mug", "2.5"], ["blue", "", "t", "1"]]
    ex = load_examples(str(h.write_csv(tmp_path / "t.csv", rows)), params_of(SPEC))
    ds = PairDataset(ex, transforms.Compose([transforms.RandomResizedCrop(8, scale=(0.5, 1.0)),
                                             transforms.ToTensor()]),
                     SimpleTokenizer(context_length=6), image_size=8, seed=1)
    item = ds[0]
    assert item["left_tokens"].shape == (1, 6) and item["right_tokens"].shape == (1, 6)
    assert item["image"].shape == (3, 8, 8) and float(item["weight"]) == 2.5
    assert torch.equal(ds[1]["image"], torch.zeros(3, 8, 8))  # empty image cell: blank, weight 0
    assert ds[1]["right_weights"].tolist() == [0.0, 1.0]
    # augmentation is seeded per (seed, epoch, sample): reproducible, and new each epoch
    assert torch.equal(ds[0]["image"], item["image"])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], item["image"])


def test_images_from_http_and_fsspec_urls(tmp_path, h):
    import functools
    import http.server
    import threading

    import fsspec

    h.write_image(tmp_path / "web.png", colour=(1, 2, 3))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with fsspec.open("memory://bucket/imgs/mem.png", "wb") as f:
            f.write((tmp_path / "web.png").read_bytes())
        base = f"http://127.0.0.1:{server.server_address[1]}"
        rows = [["query", "image", "title", "score"], ["a", f"{base}/web.png", "t", "1"],
                ["b", "memory://bucket/imgs/mem.png", "t", "1"], ["c", f"{base}/missing.png", "t", "1"]]
        ex = load_examples(str(h.write_csv(tmp_path / "t.csv", rows)), params_of(SPEC))
        with pytest.raises(DataError) as info:
            check_images(ex)
        assert [(p.row, p.column) for p in info.value.problems] == [(3, "image")]
        assert "missing.png" in str(info.value) and "404" in str(info.value)
        from kontrast.trainer.data import load_image

        assert load_image(f"{base}/web.png").getpixel((0, 0)) == (1, 2, 3)
        assert load_image("memory://bucket/imgs/mem.png").getpixel((0, 0)) == (1, 2, 3)
    finally:
        server.shutdown()
