"""The node's table at scale: the builder streams the data file a block at a time (its memory
does not follow the file's size) and gives the table that checking the file whole gives; the
training table's known pairs are built once per node and mapped by every rank."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kontrast.trainer.data.read as read
from kontrast.trainer.data.examples import load_examples, parse_examples
from kontrast.trainer.errors import DataError
from specs import params_of

FIELDS = {"leftKeys": ["query"], "leftWeights": [1.0], "rightKeys": ["image", "title"],
          "rightWeights": [0.75, 0.25], "weightKey": "score"}
BY_ID_COLUMNS = {**FIELDS, "rightWeights": [0.5, 0.5], "queryIdKey": "qid", "docIdKey": "did"}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KONTRAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def catalogue(rows: int, seed: int = 0) -> str:
    """Rows whose queries, images and titles repeat across the whole file (so ids span blocks),
    with empty titles and images (field weights renormalised) and weights of 0."""
    rnd = random.Random(seed)
    lines = ["query,image,title,score,qid,did"]
    for _ in range(rows):
        image = rnd.choice(["a.png", "b.png", "sub/c.png", "/abs/d.png", "http://x/e.jpg", "file:///f.png"])
        title = rnd.choice(["", f"t{rnd.randint(0, 60)}"])
        lines.append(f"q{rnd.randint(0, 300)},{image if title else image or 'a.png'},{title},{rnd.randint(0, 3)},"
                     f"{rnd.randint(0, 90)},{rnd.randint(0, 70)}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("spec", [FIELDS, BY_ID_COLUMNS], ids=["by-fields", "by-id-columns"])
def test_a_file_read_in_many_blocks_gives_the_table_of_checking_it_whole(tmp_path, monkeypatch, spec):
    text = catalogue(3000)
    path = tmp_path / "train.csv"
    path.write_text(text)
    whole = parse_examples(read.parse_table(str(path), text), params_of(spec))
    monkeypatch.setattr(read, "BLOCK_BYTES", 4096)
    streamed = load_examples(str(path), params_of(spec))
    assert streamed.table.column("image").num_chunks > 10       # read and written a block at a time
    for name in ("left_ids", "right_ids", "image_codes", "weights", "left_weights", "right_weights"):
        assert np.array_equal(getattr(streamed, name), getattr(whole, name)), name
    assert [streamed.image(i) for i in range(len(whole))] == [whole.image(i) for i in range(len(whole))]
    assert [streamed.right_texts(i) for i in range(len(whole))] == [whole.right_texts(i) for i in range(len(whole))]
    assert streamed.left_texts(2999) == whole.left_texts(2999)
    (images, rows), (whole_images, whole_rows) = streamed.used_images(), whole.used_images()
    assert images.to_pylist() == whole_images.to_pylist() and np.array_equal(rows, whole_rows)


def test_problems_in_later_blocks_name_their_rows_and_lines(tmp_path, monkeypatch):
    body = catalogue(2000).splitlines()
    body[1500] = body[1500].rsplit(",", 3)[0] + ",x,1,1"                 # row 1500: a weight that is no number
    body[1800] = ',"two\nlines",' + body[1800].split(",", 2)[2]       # row 1800: no query, on lines 1801-1802
    path = tmp_path / "train.csv"
    path.write_text("\n".join(body) + "\n")
    monkeypatch.setattr(read, "BLOCK_BYTES", 4096)
    with pytest.raises(DataError) as info:
        load_examples(str(path), params_of(FIELDS))
    problems = [(p.row, p.line, p.column) for p in info.value.problems]
    assert problems == [(1500, 1501, "score"), (1800, 1802, "query")]   # a row's last line, as before


_BUILD = """
import json, sys
import pyarrow as pa
import kontrast.trainer.data.read as read
from kontrast.trainer.data.shared_table import build_table_file
from kontrast.trainer.data.columns import Columns
read.BLOCK_BYTES = 256 << 10
cols = Columns(("query",), ("image", "title"), (1.0,), (0.75, 0.25), "score")
build_table_file(sys.argv[1], cols, __import__("pathlib").Path(sys.argv[2]), True)
print(json.dumps({"arrow_peak": pa.default_memory_pool().max_memory()}))
"""


def test_the_builder_holds_blocks_not_the_file(tmp_path):
    """Arrow's memory while the table is built stays well below the CSV's size: the parsed file
    is never held whole (a whole-file parse alone holds more than the file)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rows = 200_000
    i = np.arange(rows)
    path = tmp_path / "big.csv"
    pacsv.write_csv(pa.table({"query": pa.array(np.char.add("a query about thing ", (i % 5000).astype(str))),
                              "image": pa.array(np.char.add("images/", (i % 700).astype(str))),
                              "title": pa.array(np.char.add("a product title with words ", (i % 9000).astype(str))),
                              "score": pa.array((1 + i % 3).astype(str))}), path)
    done = subprocess.run([sys.executable, "-c", _BUILD, str(path), str(tmp_path / "t.arrow")],
                          capture_output=True, text=True, check=True)
    peak = json.loads(done.stdout.splitlines()[-1])["arrow_peak"]
    assert peak < 1.0 * path.stat().st_size, (peak, path.stat().st_size)


_RANK = """
import sys, time
from kontrast.trainer.data import pairs_file, shared_table
from kontrast.trainer.data.examples import load_examples
from kontrast.trainer.distributed import World
from kontrast.trainer.run import setup
from specs import params_of
real = pairs_file._build_in_child
def counted(*a):
    print("built", flush=True)
    time.sleep(1.0)                      # the other rank waits on the lock meanwhile
    return real(*a)
pairs_file._build_in_child = counted
shared_table.IN_PROCESS_MAX_BYTES = 0    # computed in a child process, as for large tables
spec = {"leftKeys": ["query"], "leftWeights": [1.0], "rightKeys": ["image", "title"], "rightWeights": [0.75, 0.25],
        "weightKey": "score"}
known = setup._known_pairs(load_examples(sys.argv[1], params_of(spec)), World())
mapped = [line.split()[-1] for line in open("/proc/self/maps") if ".known" in line]
print(len(known), int(known.keys.sum()), " ".join(sorted(set(mapped))), flush=True)
"""


def test_the_known_pairs_are_built_once_per_node_and_mapped_by_every_rank(tmp_path, cache):
    path = tmp_path / "train.csv"
    path.write_text(catalogue(2000))
    load_examples(str(path), params_of(FIELDS))         # the table exists; the ranks race for the pairs
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}   # tests/, for specs.py
    ranks = [subprocess.Popen([sys.executable, "-c", _RANK, str(path)], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [r.communicate(timeout=120)[0].splitlines() for r in ranks]
    assert all(r.returncode == 0 for r in ranks)
    assert sum(o.count("built") for o in outs) == 1            # one rank had them built, the other mapped the file
    files = list((cache / "tables").glob("*.arrow.known*"))
    assert len(files) == 1
    summaries = [o[-1].split() for o in outs]
    assert summaries[0] == summaries[1] and int(summaries[0][0]) > 0
    assert summaries[0][2:] == [str(files[0])]               # both ranks' pairs are that file's pages


def test_a_check_builds_the_table_in_its_own_process(tmp_path, monkeypatch):
    """``kontrast train --check`` exits once the data is checked, so it builds a large file's
    table itself instead of starting a child process for it (a third of a 1M-row check)."""
    from kontrast.trainer.data import shared_table

    path = tmp_path / "train.csv"
    path.write_text(catalogue(100))
    monkeypatch.setattr(shared_table, "IN_PROCESS_MAX_BYTES", 0)           # "large"
    monkeypatch.setattr(shared_table, "_build_in_child", lambda *a: pytest.fail("a child process was started"))
    assert len(load_examples(str(path), params_of(FIELDS), build_here=True)) == 100


def test_codes_numbered_over_many_merges_are_those_of_one_pass(monkeypatch):
    """The builder numbers each column's values a block at a time and merges the pending
    blocks into the values numbered so far; over many merges, with values first seen in every
    part of the stream, the codes are those of numbering the whole column at once (first
    appearance), and pairs of columns get ``dense_ids``'s ids."""
    from kontrast.trainer.data import arrow
    from kontrast.trainer.data.build import FirstSeenCodes, combined_block_codes
    from kontrast.trainer.data.check import codes, dense_ids

    merges = []
    real_merge = FirstSeenCodes._merge

    def merge(self):
        merges.append(self)
        real_merge(self)

    monkeypatch.setattr(FirstSeenCodes, "MIN_MERGE", 7)
    monkeypatch.setattr(FirstSeenCodes, "_merge", merge)
    rnd = np.random.default_rng(0)
    rows = 6000
    growing = rnd.integers(0, 1 + np.arange(rows) // 3)            # new values keep coming, old ones repeat
    few = rnd.integers(0, 40, rows)
    columns = [arrow.strings([f"value {v}" for v in growing]), arrow.strings([f"t{v}" for v in few])]
    coded = [FirstSeenCodes(), FirstSeenCodes()]
    ends = np.cumsum(rnd.integers(1, 150, rows))
    for start, end in zip(np.r_[0, ends[ends < rows]], np.r_[ends[ends < rows], rows]):
        for column, codes_ in zip(columns, coded):
            codes_.add(column.slice(start, end - start))
    whole = codes(columns[0])
    assert np.array_equal(np.concatenate(coded[0].block_codes()), whole)
    assert coded[0].count == len(np.unique(whole))
    assert sum(m is coded[0] for m in merges) > 10                 # many merges, not one at the end
    assert np.array_equal(combined_block_codes(coded, rows), dense_ids(columns))


def test_the_builder_process_gives_freed_memory_back(tmp_path, monkeypatch):
    """A large file's table is built in a process of its own whose allocators give each block's
    temporaries back: Arrow's buffers through glibc, whose mmap threshold is fixed (a freed
    large block goes back to the system, and the next one is mapped again rather than taken
    from a heap that only grows). The user's own glibc tunables are kept."""
    from kontrast.trainer.data import shared_table
    from kontrast.trainer.data.columns import Columns

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
    path = tmp_path / "train.csv"
    path.write_text(catalogue(500))
    built = shared_table._build_in_child(str(path), Columns.of(params_of(FIELDS)), tmp_path / "t.arrow", True)
    assert built["memory_pool"] == "system" and built["peak_rss_mib"] > 0
    assert (tmp_path / "t.arrow").exists()
    env = shared_table.builder_environment(os.environ)
    assert env["GLIBC_TUNABLES"].startswith("glibc.malloc.arena_max=4:")
    # glibc's default threshold rises to a freed block's size, so the same size comes from the
    # heap next time; fixed, it is mapped (and given back when freed) every time
    probe = ("import ctypes\n"
             "libc = ctypes.CDLL('libc.so.6')\n"
             "names = 'arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost'.split()\n"
             "class Info(ctypes.Structure): _fields_ = [(n, ctypes.c_size_t) for n in names]\n"
             "libc.mallinfo2.restype = Info\n"
             "libc.malloc.restype = ctypes.c_void_p\n"
             "libc.free(ctypes.c_void_p(libc.malloc(300 << 10)))\n"
             "mapped = libc.mallinfo2().hblkhd\n"
             "p = libc.malloc(300 << 10)\n"
             "print(libc.mallinfo2().hblkhd - mapped >= 300 << 10)\n")
    mapped = [subprocess.run([sys.executable, "-c", probe], env=e, capture_output=True, text=True, check=True).stdout
              for e in ({k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}, env)]
    assert mapped == ["False\n", "True\n"]
