"""The installed package (a wheel, the images) holds every subpackage of the source tree.

The editable install maps whole folders, so a subpackage missing from pyproject's explicit
`packages` list only shows in an image: the node tier once ran a trainer without
kontrast.trainer.mining (ModuleNotFoundError in the pod)."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_for_installs():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for package, folder in setuptools["package-dir"].items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(root).parts
            found.add(".".join((package, *rel)))
    assert found - set(setuptools["packages"]) == set(), "add these to pyproject's packages list"
