"""The chart's NOTES (what `helm install` prints) name only what exists: every repository path
is there, every command parses, and every file they apply or validate is a valid TrainJob file.

The NOTES once told every new user to apply a file that had never existed; this keeps them from
drifting again."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from kontrast.cli import main as kontrast_main

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kontrast"
NOTES = CHART / "templates" / "NOTES.txt"
PATH = re.compile(r"(?<![\w/.-])((?:examples|crds|files)/[\w./-]*\w)")


def notes_text() -> str:
    """The NOTES with each template action as the placeholder word "x" (a path or command
    never sits inside one, but a value such as the namespace does)."""
    return re.sub(r"\{\{.*?\}\}", "x", NOTES.read_text())


def commands(tool: str) -> list[list[str]]:
    """Every `tool ...` command line of the NOTES, also in backticks, without its trailing comment."""
    found = []
    for line in notes_text().splitlines():
        for text in re.findall(r"`([^`]+)`", line) or [line.strip()]:
            if text.startswith(tool + " "):
                found.append(shlex.split(text.split("  #")[0].replace("NAME", "example")))
    return found


def test_every_path_the_notes_name_exists():
    paths = PATH.findall(notes_text())
    assert "examples/cluster-cpu.yaml" in paths
    missing = [p for p in paths if not (REPO / p).exists() and not (CHART / p).exists()]
    assert not missing, f"NOTES.txt names files that do not exist: {missing}"


@pytest.mark.k8s  # kubectl from the test control plane's binaries
def test_every_kubectl_command_parses():
    from harness.controlplane import ensure_binaries

    kubectl = ensure_binaries() / "kubectl"
    cmds = commands("kubectl")
    assert len(cmds) >= 6
    for cmd in cmds:
        # --help makes kubectl parse the verb and every flag without talking to a server.
        proc = subprocess.run([str(kubectl), *cmd[1:], "--help"], capture_output=True, text=True)
        assert proc.returncode == 0, f"{shlex.join(cmd)}: {proc.stderr}"


def applied_and_validated_files() -> list[str]:
    files = [cmd[cmd.index("-f") + 1] for cmd in commands("kubectl") if "apply" in cmd]
    files += [cmd[2] for cmd in commands("kontrast") if cmd[1] == "validate" and cmd[2] != "FILE"]
    return files


@pytest.mark.parametrize("path", sorted(set(applied_and_validated_files())))
def test_files_the_notes_apply_are_valid(path, capsys):
    file = REPO / path if (REPO / path).exists() else CHART / path
    kinds = [d.get("kind") for d in yaml.safe_load_all(file.read_text()) if d]
    if "TrainJob" not in kinds:
        assert path.startswith("crds/") and kinds == ["CustomResourceDefinition"], kinds
        return
    assert kontrast_main(["validate", str(file)]) == 0, capsys.readouterr().err
    assert "valid TrainJob" in capsys.readouterr().out


def test_validate_takes_a_file_with_other_objects_but_one_trainjob(tmp_path, capsys):
    """examples/cluster-cpu.yaml carries its data volume's claim; a file with two TrainJobs is
    refused with the count, not validated half."""
    two = tmp_path / "two.yaml"
    job = (REPO / "examples" / "cluster-cpu.yaml").read_text().split("---", 1)[1]
    two.write_text(job + "---" + job)
    assert kontrast_main(["validate", str(two)]) == 1
    assert "expected exactly one TrainJob, found 2 among 2 YAML documents" in capsys.readouterr().err
