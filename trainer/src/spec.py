"""Turn a validated, defaulted TrainJob into the values the trainer runs with.

The parameter table's static defaults come from the CRD schema (``kontrast.api`` applies
them exactly as the API server would); this module only resolves what the schema cannot
know: model-dependent defaults (beta2, eps) and where paths and URIs point. Everything here
is a pure function of the TrainJob, its file's folder and the environment, so it is cheap to
test and the same on every rank.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Optional

from kontrast.contract import PVC_ROOT_DEFAULT, PVC_ROOT_ENV

from .errors import SpecError

#: Annotation that lets `kontrast train` create the synthetic example data set when
#: trainData is missing (used by examples/trainjob.yaml; see kontrast.trainer.exampledata).
GENERATE_EXAMPLE_DATA = "kontrast.dev/generate-example-data"

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz", ".ckpt")


def has_scheme(location: str) -> bool:
    """True for URLs such as s3://b/k or https://h/p (fsspec or HTTP), False for paths."""
    return bool(_SCHEME.match(location))


def pvc_root() -> Path:
    return Path(os.environ.get(PVC_ROOT_ENV, PVC_ROOT_DEFAULT))


def resolve_location(value: str, base_dir: Path) -> str:
    """Where a spec path points, as a local path or an fsspec URL.

    pvc://claim/path maps to $KONTRAST_PVC_ROOT/claim/path (the operator mounts each claim
    there); file:// URLs become paths; other URLs are left to fsspec; relative paths are
    relative to the TrainJob file's folder (so a job runs the same from any working folder).
    """
    if value.startswith("pvc://"):
        rest = value[len("pvc://"):].strip("/")
        if not rest:
            raise ValueError(f"{value!r}: a pvc:// URI needs a claim name (pvc://<claim>/<path>)")
        return str(pvc_root().joinpath(*PurePosixPath(rest).parts))
    if value.startswith("file://"):
        return value[len("file://"):] or "/"
    if has_scheme(value):
        return value
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    return str(path)


def join_location(base: str, relative: str) -> str:
    """``relative`` resolved against the folder ``base`` (a local path or a URL)."""
    if has_scheme(relative) or relative.startswith("pvc://"):
        return resolve_location(relative, Path("/"))
    if relative.startswith("file://"):
        return relative[len("file://"):]
    if has_scheme(base):
        if relative.startswith("/"):
            scheme, _, rest = base.partition("://")
            host = rest.split("/", 1)[0]
            return f"{scheme}://{host}{relative}"
        return base.rstrip("/") + "/" + relative
    path = Path(relative).expanduser()
    return str(path if path.is_absolute() else Path(base) / path)


def parent_location(location: str) -> str:
    """The folder of a file location (path or URL)."""
    if has_scheme(location):
        return location.rsplit("/", 1)[0]
    return str(Path(location).parent)


def model_name_for_defaults(model: str) -> str:
    """The name open_clip's "vit" substring rule is applied to.

    For a model config JSON given by path the name is the file's stem (the name open_clip
    registers it under), so a folder that happens to contain "vit" does not change betas.
    """
    if model.lower().endswith(".json"):
        return PurePosixPath(model.split("://", 1)[-1]).stem
    return model


def adam_defaults(model: str) -> tuple[float, float]:
    """(beta2, eps) as open_clip derives them: "vit" in the model name (case-insensitive)
    gives (0.98, 1e-6), anything else (0.999, 1e-8)."""
    if "vit" in model_name_for_defaults(model).lower():
        return 0.98, 1.0e-6
    return 0.999, 1.0e-8


def looks_like_path(value: str, base_dir: Path) -> bool:
    """Whether ``pretrained`` names a file (path/URI) rather than an open_clip tag."""
    if value.startswith(("pvc://", "file://", "/", "./", "../", "~")) or has_scheme(value):
        return True
    if value.lower().endswith(_CHECKPOINT_SUFFIXES):
        return True
    return (base_dir / value).exists()


@dataclass(frozen=True)
class Resolved:
    """A TrainJob resolved for running: the table (``spec``) plus derived values."""

    name: str
    spec: Mapping[str, Any]
    base_dir: Path
    train_data: str
    eval_data: Optional[str]
    output: str
    model: str                      #: spec.model as written (reported, and for the vit rule)
    model_config: Optional[str]     #: resolved path/URL of a model config JSON, if given
    pretrained: Optional[str]       #: an open_clip tag, or a resolved path/URL
    pretrained_is_tag: bool
    beta2: float
    eps: float
    annotations: Mapping[str, str] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.spec[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.spec.get(key, default)


def resolve(trainjob: Mapping[str, Any], trainjob_file: Optional[str | Path] = None,
            output: Optional[str] = None) -> Resolved:
    """Resolve a defaulted, validated TrainJob object.

    ``trainjob_file``: the file it came from (relative paths are relative to its folder;
    without it, to the working folder). ``output``: a local override of spec.output, given
    relative to the working folder (the ``--output`` flag).
    """
    spec = dict(trainjob["spec"])
    metadata = trainjob.get("metadata") or {}
    base_dir = Path(trainjob_file).resolve().parent if trainjob_file else Path.cwd()
    name = metadata.get("name") or (Path(trainjob_file).stem if trainjob_file else "trainjob")

    def loc(key: str, value: Optional[str] = None) -> Optional[str]:
        value = spec.get(key) if value is None else value
        if value is None:
            return None
        try:
            return resolve_location(value, base_dir)
        except ValueError as exc:
            raise SpecError(key, str(exc)) from None

    model = spec["model"]
    model_config = loc("model") if model.lower().endswith(".json") else None
    pretrained = spec.get("pretrained")
    pretrained_is_tag = bool(pretrained) and not looks_like_path(pretrained, base_dir)
    if pretrained and not pretrained_is_tag:
        pretrained = loc("pretrained")
    beta2_default, eps_default = adam_defaults(model)
    if spec.get("logitScale") is not None and spec["logitScale"] <= 0:
        raise SpecError("logitScale", f"must be greater than 0 (it is exponentiated from its log), got {spec['logitScale']}")
    if output is not None:
        out = resolve_location(output, Path.cwd())
    else:
        out = loc("output")
    return Resolved(
        name=name,
        spec=spec,
        base_dir=base_dir,
        train_data=loc("trainData"),
        eval_data=loc("evalData"),
        output=out,
        model=model,
        model_config=model_config,
        pretrained=pretrained,
        pretrained_is_tag=pretrained_is_tag,
        beta2=spec["beta2"] if spec.get("beta2") is not None else beta2_default,
        eps=spec["eps"] if spec.get("eps") is not None else eps_default,
        annotations=dict(metadata.get("annotations") or {}),
    )
