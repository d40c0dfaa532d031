"""Defaulting as the API server does it, and the `kontrast validate` command."""

import subprocess
import sys
from pathlib import Path

import yaml

from kontrast.api import apply_defaults, spec_schema
from kontrast.api.reference import BEGIN, END, render

ROOT = Path(__file__).resolve().parents[2]


def minimal() -> dict:
    return {"apiVersion": "kontrast.dev/v1alpha1", "kind": "TrainJob", "metadata": {"name": "m"},
            "spec": {"model": "ViT-B-32", "trainData": "t.csv", "output": "out", "leftKeys": ["q"],
                     "leftWeights": [1.0], "rightKeys": ["img"], "rightWeights": [1.0], "weightKey": "w"}}


def test_table_defaults_applied_and_model_dependent_ones_left_unset():
    spec = apply_defaults(minimal())["spec"]
    assert spec["batchSize"] == 256 and spec["lr"] == 5.0e-4 and spec["warmup"] == 10000
    assert spec["precision"] == "amp" and spec["weightedLoss"] == "ce"
    assert spec["gradCheckpointing"] is True and spec["dynamicBatchSize"] is True
    for name in ("beta2", "eps", "poolingMethod", "gradClipNorm", "epochsCooldown"):
        assert name not in spec


def test_nested_defaults_fill_a_defaulted_object():
    spec = apply_defaults(minimal())["spec"]
    assert spec["scheduling"] == {"maxRestarts": 3, "suspend": False, "cleanup": "OnSuccess"}


def test_user_values_win_and_null_is_defaulted():
    obj = minimal()
    obj["spec"].update(batchSize=8, epochs=None, scheduling={"suspend": True})
    spec = apply_defaults(obj)["spec"]
    assert spec["batchSize"] == 8 and spec["epochs"] == spec_schema()["properties"]["epochs"]["default"]
    assert spec["scheduling"]["suspend"] is True and spec["scheduling"]["maxRestarts"] == 3


def test_input_is_not_mutated():
    obj = minimal()
    apply_defaults(obj)
    assert "batchSize" not in obj["spec"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "kontrast.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_show_defaults_prints_the_defaulted_object(tmp_path):
    f = tmp_path / "tj.yaml"
    f.write_text(yaml.safe_dump(minimal()))
    out = run_cli("validate", "--show-defaults", str(f))
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout) == apply_defaults(minimal())


def test_cli_lists_every_problem_with_its_path_and_fails(tmp_path):
    obj = minimal()
    obj["spec"].update(leftWeights=[1.0, 2.0], precision="fp8")
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(obj))
    out = run_cli("validate", str(f))
    assert out.returncode == 1
    assert "spec.precision: Invalid value: 'fp8'" in out.stderr
    assert "supported values" in out.stderr
    assert f"{f}: invalid TrainJob" in out.stderr


def test_cli_reports_yaml_errors_and_missing_files(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("spec: [unclosed\n")
    out = run_cli("validate", str(f))
    assert out.returncode == 1 and "not valid YAML" in out.stderr
    out = run_cli("validate", str(tmp_path / "nope.yaml"))
    assert out.returncode == 1 and "file not found" in out.stderr


def test_example_trainjob_is_valid():
    out = run_cli("validate", str(ROOT / "examples" / "trainjob.yaml"))
    assert out.returncode == 0, out.stderr


def test_readme_reference_is_generated_from_the_crd():
    readme = (ROOT / "README.md").read_text()
    block = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert block == render(), "run: python -m kontrast.api.reference README.md"



def test_checkout_never_shadows_the_stdlib_operator_module():
    out = subprocess.run([sys.executable, "-c", "import operator; print(operator.__file__)"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "lib/python" in out.stdout, out.stdout + out.stderr
