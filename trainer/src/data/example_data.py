"""A small synthetic product-search data set, generated deterministically.

Products are (category, colour, pattern) triples, drawn with PIL as a coloured shape per
category (mug, ball, box, lamp, vase, hat) filled plain, striped, dotted or checked. Each
has an image and a title ("red striped ceramic mug"). Queries name some of a product's
attributes ("red mug", "striped lamp", "blue dotted vase"); graded relevance is 3 for a
product with every attribute the query names, 2 when only the pattern differs, and 1 for a
product of the right category with other attributes (a few sampled per query). Queries are
split into train and eval (documents are shared, queries are not), so the evaluation
measures how well the model ranks documents for queries it has not seen.

Files written into the target folder: ``train.csv``, ``eval.csv`` (columns query, image,
title, score) and ``images/<product>.png``. The same seed gives byte-identical files.

Used by ``examples/generate_data.py`` and by ``kontrast train`` for TrainJobs that carry
the annotation ``kontrast.dev/generate-example-data: "true"`` when trainData is missing.
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

CATEGORIES = {  # category -> material used in titles
    "mug": "ceramic", "ball": "rubber", "box": "cardboard",
    "lamp": "metal", "vase": "glass", "hat": "wool",
}
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "pink": (245, 130, 190), "brown": (120, 75, 40),
}
PATTERNS = ("plain", "striped", "dotted", "checked")
IMAGE_SIZE = 64
BACKGROUND = (235, 235, 235)
HEADER = ["query", "image", "title", "score"]


def product_id(category: str, colour: str, pattern: str) -> str:
    return f"{colour}-{pattern}-{category}"


def title(category: str, colour: str, pattern: str) -> str:
    return f"{colour} {pattern} {CATEGORIES[category]} {category}"


def _shape_mask(category: str, size: int) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    s = size
    if category == "mug":
        d.rectangle([s * 0.22, s * 0.25, s * 0.68, s * 0.85], fill=255)
        d.ellipse([s * 0.58, s * 0.38, s * 0.88, s * 0.70], outline=255, width=max(2, s // 12))
    elif category == "ball":
        d.ellipse([s * 0.15, s * 0.15, s * 0.85, s * 0.85], fill=255)
    elif category == "box":
        d.rectangle([s * 0.15, s * 0.30, s * 0.85, s * 0.85], fill=255)
        d.polygon([(s * 0.15, s * 0.30), (s * 0.30, s * 0.15), (s * 0.95, s * 0.15), (s * 0.85, s * 0.30)], fill=255)
    elif category == "lamp":
        d.polygon([(s * 0.50, s * 0.08), (s * 0.15, s * 0.55), (s * 0.85, s * 0.55)], fill=255)
        d.rectangle([s * 0.45, s * 0.55, s * 0.55, s * 0.85], fill=255)
        d.rectangle([s * 0.28, s * 0.85, s * 0.72, s * 0.93], fill=255)
    elif category == "vase":
        d.ellipse([s * 0.25, s * 0.35, s * 0.75, s * 0.92], fill=255)
        d.rectangle([s * 0.40, s * 0.08, s * 0.60, s * 0.45], fill=255)
    elif category == "hat":
        d.rectangle([s * 0.05, s * 0.68, s * 0.95, s * 0.80], fill=255)
        d.polygon([(s * 0.25, s * 0.70), (s * 0.32, s * 0.20), (s * 0.68, s * 0.20), (s * 0.75, s * 0.70)], fill=255)
    else:
        raise ValueError(category)
    return m


def _pattern_fill(colour: tuple[int, int, int], pattern: str, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), colour)
    d = ImageDraw.Draw(img)
    dark = tuple(int(c * 0.35) for c in colour)
    step = max(4, size // 8)
    if pattern == "striped":
        for y in range(0, size, step):
            d.rectangle([0, y, size, y + step // 2 - 1], fill=dark)
    elif pattern == "dotted":
        r = max(1, step // 4)
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                d.ellipse([x - r, y - r, x + r, y + r], fill=dark)
    elif pattern == "checked":
        for y in range(0, size, step):
            for x in range(0, size, step):
                if (x // step + y // step) % 2 == 0:
                    d.rectangle([x, y, x + step - 1, y + step - 1], fill=dark)
    return img


def draw_product(category: str, colour: str, pattern: str, size: int = IMAGE_SIZE) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUND)
    img.paste(_pattern_fill(COLOURS[colour], pattern, size), (0, 0), _shape_mask(category, size))
    return img


def _rows_for(query: tuple, rng: random.Random, partial: int) -> list[tuple[tuple, int]]:
    """(product, score) pairs for a query (category, colour or None, pattern or None)."""
    category, colour, pattern = query
    out = []
    same_category = [(category, c, p) for c in COLOURS for p in PATTERNS]
    for prod in same_category:
        _, c, p = prod
        if (colour is None or c == colour) and (pattern is None or p == pattern):
            out.append((prod, 3))
        elif colour is not None and pattern is not None and c == colour:
            out.append((prod, 2))
    graded = {prod for prod, _ in out}
    others = [prod for prod in same_category if prod not in graded]
    for prod in rng.sample(others, min(partial, len(others))):
        out.append((prod, 1))
    return out


def query_text(query: tuple) -> str:
    category, colour, pattern = query
    return " ".join(w for w in (colour, pattern, category) if w)


def generate(folder: str | Path, *, seed: int = 0, eval_fraction: float = 0.2, partial: int = 2) -> Path:
    """Write the data set into ``folder`` (created; written to a temporary sibling first and
    renamed, so a concurrent or interrupted generation never leaves half a data set)."""
    folder = Path(folder)
    if (folder / "train.csv").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _write(tmp, seed=seed, eval_fraction=eval_fraction, partial=partial)
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, folder)  # also replaces an empty folder
        except OSError:
            if not (folder / "train.csv").exists():  # not a concurrent generator's result
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write(folder: Path, *, seed: int, eval_fraction: float, partial: int) -> None:
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True)
    for category in CATEGORIES:
        for colour in COLOURS:
            for pattern in PATTERNS:
                draw_product(category, colour, pattern).save(
                    folder / "images" / f"{product_id(category, colour, pattern)}.png", optimize=False)
    queries = [(cat, col, None) for cat in CATEGORIES for col in COLOURS]
    queries += [(cat, None, pat) for cat in CATEGORIES for pat in PATTERNS]
    queries += [(cat, col, pat) for cat in CATEGORIES for col in COLOURS for pat in PATTERNS]
    rng.shuffle(queries)
    n_eval = int(round(len(queries) * eval_fraction))
    splits = {"eval.csv": queries[:n_eval], "train.csv": queries[n_eval:]}
    for name, qs in splits.items():
        rows = []
        for q in qs:
            for (cat, col, pat), score in _rows_for(q, rng, partial):
                rows.append([query_text(q), f"images/{product_id(cat, col, pat)}.png", title(cat, col, pat), score])
        if name == "train.csv":
            rng.shuffle(rows)
        with open(folder / name, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(HEADER)
            w.writerows(rows)
