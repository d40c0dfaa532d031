"""Training and evaluation data: CSV/TSV tables of (query fields, document fields, weight).

One row is one (left, right) pair. The left fields (``leftKeys``) are texts; the first right
field (``rightKeys[0]``) is an image reference, the others texts; ``weightKey`` holds the
row's weight (graded relevance). Reading is split into a thin I/O edge (``read_table``,
``read_image_bytes``) and pure parsing (``parse_examples``), so every rule is testable on
in-memory rows.

Rules (each violation is a ``DataError`` naming file, row and column, raised before
training starts):

* every named column exists in the header;
* the weight is a finite number >= 0 (0 is allowed: the row only serves as a negative);
* a field that is empty in a row gets weight 0 there, and the row's field weights are
  renormalised to sum to 1; a row whose fields with non-zero weight are all empty on one
  side is an error (it has no embedding on that side);
* every image referenced by a row that uses it (image weight > 0) is read and decoded
  once before training (``check_images``); the log says how many were checked.

``left_ids`` / ``right_ids`` number the distinct queries (all left field values) and
documents (all right field values). The loss uses them to keep a duplicate query's other
relevant documents out of its negatives, and evaluation uses them to rank each distinct
query against each distinct document.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .errors import DataError, DataProblem, ProblemCollector
from .locations import has_scheme, join_location, parent_location
from .params import Params

log = logging.getLogger(__name__)

HTTP_TIMEOUT_S = 60


@dataclass
class Table:
    file: str
    header: list[str]
    rows: list[tuple[int, int, list[str]]]   #: (row number, line number, values)


@dataclass
class Examples:
    """Parsed rows of one data file, ready for a Dataset or for evaluation."""

    file: str
    left_keys: list[str]
    right_keys: list[str]
    left_texts: list[list[str]]         #: [n][len(leftKeys)]
    images: list[Optional[str]]         #: [n] resolved image location, None when empty
    right_texts: list[list[str]]        #: [n][len(rightKeys) - 1]
    left_weights: np.ndarray            #: [n, len(leftKeys)], rows sum to 1
    right_weights: np.ndarray           #: [n, len(rightKeys)], rows sum to 1
    weights: np.ndarray                 #: [n] row weight (>= 0)
    left_ids: np.ndarray                #: [n] int64, equal for equal left fields
    right_ids: np.ndarray               #: [n] int64, equal for equal right fields
    row_numbers: list[int]              #: [n] 1-based data row, for messages
    line_numbers: list[int]

    def __len__(self) -> int:
        return len(self.weights)

    @property
    def uses_images(self) -> bool:
        """False when the image field has weight 0 everywhere (no image is ever read)."""
        return bool(len(self) and self.right_weights[:, 0].max() > 0)


# --------------------------------------------------------------------------------------------
# I/O edge

def delimiter_for(location: str) -> str:
    name = location.lower()
    for ext in (".gz", ".bz2", ".xz", ".zst"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return "\t" if name.endswith(".tsv") else ","


def read_table(location: str) -> Table:
    """Read a CSV (or .tsv, tab-separated; optionally compressed) through fsspec."""
    import fsspec

    try:
        with fsspec.open(location, "rt", encoding="utf-8-sig", newline="", compression="infer") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError([DataProblem(location, "file not found")]) from None
    except Exception as exc:  # permission, network, decoding: all permanent for this run
        raise DataError([DataProblem(location, f"cannot read: {exc}")]) from None
    return parse_table(location, text)


def parse_table(file: str, text: str) -> Table:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter_for(file))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError([DataProblem(file, "the file is empty (it needs a header row)")]) from None
    except csv.Error as exc:
        raise DataError([DataProblem(file, f"malformed header: {exc}", row=0, line=1)]) from None
    rows = []
    row = 0
    try:
        for values in reader:
            if not values or (len(values) == 1 and not values[0].strip()):
                continue  # blank line
            row += 1
            rows.append((row, reader.line_num, values))
    except csv.Error as exc:
        raise DataError([DataProblem(file, f"malformed CSV: {exc}", row=row + 1, line=reader.line_num)]) from None
    return Table(file, [h.strip() for h in header], rows)


def read_image_bytes(location: str) -> bytes:
    """Bytes of an image given by local path, http(s) URL or fsspec URL."""
    if location.startswith(("http://", "https://")):
        req = urllib.request.Request(location, headers={"User-Agent": "kontrast"})
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
            return resp.read()
    if has_scheme(location):
        import fsspec

        with fsspec.open(location, "rb") as f:
            return f.read()
    with open(location, "rb") as f:
        return f.read()


def load_image(location: str) -> Image.Image:
    """Decode an image fully (``load``), so a truncated file fails here and not mid-run."""
    img = Image.open(io.BytesIO(read_image_bytes(location)))
    img.load()
    return img.convert("RGB")


# --------------------------------------------------------------------------------------------
# pure parsing

def _column_index(table: Table, spec: Params, problems: ProblemCollector) -> dict[str, int]:
    index: dict[str, int] = {}
    seen: dict[str, int] = {}
    for i, h in enumerate(table.header):
        if h in seen:
            problems.add(DataProblem(table.file, f"the header names column {h!r} twice", row=0, line=1, column=h))
        seen.setdefault(h, i)
    wanted = [(k, f"spec.leftKeys[{i}]") for i, k in enumerate(spec.left_keys)]
    wanted += [(k, f"spec.rightKeys[{i}]") for i, k in enumerate(spec.right_keys)]
    wanted += [(spec.weight_key, "spec.weightKey")]
    for key, field in wanted:
        if key in seen:
            index[key] = seen[key]
        else:
            have = ", ".join(repr(h) for h in table.header) or "nothing"
            problems.add(DataProblem(table.file, f"column not found (named by {field}); the header has {have}",
                                     row=0, line=1, column=key))
    return index


def _side_weights(base: Sequence[float], present: Sequence[bool]) -> Optional[np.ndarray]:
    """Field weights of one row: 0 for empty fields, renormalised; None if nothing is left."""
    w = np.array([b if p else 0.0 for b, p in zip(base, present)], dtype=np.float64)
    total = w.sum()
    if total <= 0:
        return None
    return w / total


def parse_weight(value: str) -> tuple[Optional[float], Optional[str]]:
    """(weight, None) or (None, reason)."""
    text = value.strip()
    if not text:
        return None, "the weight is empty; it must be a number >= 0"
    try:
        w = float(text)
    except ValueError:
        return None, f"the weight {text!r} is not a number"
    if not math.isfinite(w):
        return None, f"the weight {text!r} is not a finite number"
    if w < 0:
        return None, f"the weight {text!r} is negative; weights must be >= 0"
    return w, None


def parse_examples(table: Table, spec: Params, *, require_positive_weight: bool = True,
                   max_problems: int = 20) -> Examples:
    """Validate and parse a table against the TrainJob's columns and weights (pure)."""
    problems = ProblemCollector(max_problems)
    file = table.file
    col = _column_index(table, spec, problems)
    problems.raise_if_any()

    left_keys, right_keys, wkey = list(spec.left_keys), list(spec.right_keys), spec.weight_key
    lw_base, rw_base = list(spec.left_weights), list(spec.right_weights)
    base_dir = parent_location(file)
    width = len(table.header)

    left_texts, images, right_texts = [], [], []
    lws, rws, ws, row_numbers, line_numbers = [], [], [], [], []
    left_key_ids: dict[tuple, int] = {}
    right_key_ids: dict[tuple, int] = {}
    left_ids, right_ids = [], []

    for row, line, values in table.rows:
        if len(values) > width:
            problems.add(DataProblem(file, f"the row has {len(values)} fields but the header has {width}",
                                     row=row, line=line))
            continue
        values = values + [""] * (width - len(values))

        def get(key: str) -> str:
            return values[col[key]].strip()

        lefts = [get(k) for k in left_keys]
        rights = [get(k) for k in right_keys]
        weight, why = parse_weight(values[col[wkey]])
        ok = True
        if why:
            problems.add(DataProblem(file, why, row=row, line=line, column=wkey))
            ok = False
        side_weights = {}
        for side, keys, base, vals in (("left", left_keys, lw_base, lefts), ("right", right_keys, rw_base, rights)):
            side_weights[side] = _side_weights(base, [bool(v) for v in vals])
            if side_weights[side] is None:
                used = [k for k, b in zip(keys, base) if b > 0]
                problems.add(DataProblem(file, f"the row is empty on the whole {side} side (no value in {used})",
                                         row=row, line=line, column=used[0] if len(used) == 1 else None))
                ok = False
        lw, rw = side_weights["left"], side_weights["right"]
        if not ok:
            continue
        image = join_location(base_dir, rights[0]) if rights[0] else None
        left_texts.append(lefts)
        images.append(image)
        right_texts.append(rights[1:])
        lws.append(lw)
        rws.append(rw)
        ws.append(weight)
        row_numbers.append(row)
        line_numbers.append(line)
        lkey = tuple(lefts)
        rkey = (image,) + tuple(rights[1:])
        left_ids.append(left_key_ids.setdefault(lkey, len(left_key_ids)))
        right_ids.append(right_key_ids.setdefault(rkey, len(right_key_ids)))

    problems.raise_if_any()
    if not ws:
        raise DataError([DataProblem(file, "the file has a header but no data rows")])
    weights = np.asarray(ws, dtype=np.float64)
    if require_positive_weight and not (weights > 0).any():
        raise DataError([DataProblem(file, "every row has weight 0, so there is nothing to learn from",
                                     column=wkey)])
    return Examples(
        file=file,
        left_keys=left_keys,
        right_keys=right_keys,
        left_texts=left_texts,
        images=images,
        right_texts=right_texts,
        left_weights=np.stack(lws).astype(np.float32),
        right_weights=np.stack(rws).astype(np.float32),
        weights=weights.astype(np.float32),
        left_ids=np.asarray(left_ids, dtype=np.int64),
        right_ids=np.asarray(right_ids, dtype=np.int64),
        row_numbers=row_numbers,
        line_numbers=line_numbers,
    )


def load_examples(location: str, spec: Params, *, require_positive_weight: bool = True) -> Examples:
    return parse_examples(read_table(location), spec, require_positive_weight=require_positive_weight)


def image_uses(examples: Examples) -> dict[str, int]:
    """Each distinct image some row uses (image weight > 0) -> the first such row's index.

    Rows whose image weight is 0 (an empty cell, or rightWeights[0] == 0) never read their
    image, so their images are neither loaded nor checked.
    """
    first_use: dict[str, int] = {}
    for i, image in enumerate(examples.images):
        if image is not None and examples.right_weights[i, 0] > 0:
            first_use.setdefault(image, i)
    return first_use


def find_image_problems(examples: Examples, *, part: int = 0, parts: int = 1, threads: int = 8,
                        loader: Callable[[str], Image.Image] = load_image) -> tuple[int, list[DataProblem]]:
    """Decode share ``part`` of ``parts`` of the distinct used images.

    Returns (number of distinct used images in total, problems found in this share).
    """
    uses = list(image_uses(examples).items())
    mine = uses[part::parts]
    column = examples.right_keys[0]

    def check(item: tuple[str, int]) -> Optional[DataProblem]:
        image, i = item
        try:
            loader(image)
            return None
        except FileNotFoundError:
            why = "file not found"
        except Exception as exc:  # noqa: BLE001 - any decode failure is the data's problem
            why = f"{type(exc).__name__}: {exc}"
        return DataProblem(examples.file, f"cannot read image {image!r}: {why}",
                           row=examples.row_numbers[i], line=examples.line_numbers[i], column=column)

    if not mine:
        return len(uses), []
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(mine)))) as pool:
        problems = [p for p in pool.map(check, mine) if p is not None]
    return len(uses), problems


def raise_problems(problems: Sequence[DataProblem], limit: int = 20) -> None:
    collector = ProblemCollector(limit)
    for p in sorted(problems, key=lambda p: (p.row or 0)):
        collector.add(p)
    collector.raise_if_any()


def check_images(examples: Examples, *, threads: int = 8,
                 loader: Callable[[str], Image.Image] = load_image) -> int:
    """Decode every distinct used image; raise DataError naming the rows of unreadable ones.
    Returns how many distinct images were checked."""
    total, problems = find_image_problems(examples, threads=threads, loader=loader)
    raise_problems(problems)
    return total


# --------------------------------------------------------------------------------------------
# torch Dataset

def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed for augmentation: the same sample in the same epoch gets the same
    crop whatever the number of workers or processes, so runs are reproducible across them."""
    return (((seed * 1_000_003) ^ (epoch * 10_007)) * 1_000_000_007 + index) % (2 ** 63 - 1)


class PairDataset(torch.utils.data.Dataset):
    """Items: tokenized left/right texts, the image tensor, field weights, row weight, ids."""

    def __init__(self, examples: Examples, transform: Callable, tokenizer: Callable,
                 image_size: Iterable[int] | int, seed: int = 0,
                 image_loader: Callable[[str], Image.Image] = load_image):
        self.ex = examples
        self.transform = transform
        self.tokenizer = tokenizer
        size = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size, image_size)
        self.blank = torch.zeros((3, *size))
        self.seed = seed
        self.epoch = 0
        self.image_loader = image_loader
        self.image_active = examples.uses_images

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ex)

    def _image(self, index: int) -> torch.Tensor:
        location = self.ex.images[index]
        if not self.image_active or location is None or self.ex.right_weights[index, 0] <= 0:
            return self.blank
        img = self.image_loader(location)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, index))
            return self.transform(img)

    def left_item(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "left_tokens": self.tokenizer(self.ex.left_texts[index]),
            "left_weights": torch.from_numpy(self.ex.left_weights[index]),
        }

    def right_item(self, index: int) -> dict[str, torch.Tensor]:
        right_texts = self.ex.right_texts[index]
        return {
            "image": self._image(index),
            "right_tokens": (self.tokenizer(right_texts) if right_texts
                             else torch.zeros((0, self._context_length()), dtype=torch.long)),
            "right_weights": torch.from_numpy(self.ex.right_weights[index]),
        }

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ex = self.ex
        return {
            **self.left_item(index),
            **self.right_item(index),
            "weight": torch.tensor(float(ex.weights[index])),
            "left_id": torch.tensor(int(ex.left_ids[index])),
            "right_id": torch.tensor(int(ex.right_ids[index])),
            "index": torch.tensor(index),
        }

    def _context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", 77))


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return torch.utils.data.default_collate(items)


class SideDataset(torch.utils.data.Dataset):
    """One side ("left" or "right") of chosen rows of a PairDataset (for evaluation, where
    queries need no image and documents no query text)."""

    def __init__(self, pairs: PairDataset, rows: Sequence[int], side: str):
        if side not in ("left", "right"):
            raise ValueError(side)
        self.pairs, self.rows, self.side = pairs, list(rows), side

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.rows[i]
        return self.pairs.left_item(row) if self.side == "left" else self.pairs.right_item(row)
