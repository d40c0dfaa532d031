"""A TrainJob resolved for running: its parameters plus who it is and where it came from.

``kontrast.api`` validates the TrainJob and applies the CRD's defaults; ``resolve`` turns
the result into a ``Resolved``: the typed ``Params`` (params.py: model-dependent defaults and
locations resolved once) and the identity of the run (name, uid, annotations). A pure
function of the TrainJob, its file's folder and the environment, the same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from .errors import PermanentError, SpecError
from .locations import resolve_location
from .params import Params

#: Annotation that lets `kontrast train` create the synthetic example data set when
#: trainData is missing (used by examples/trainjob.yaml; see kontrast.trainer.data.example_data).
GENERATE_EXAMPLE_DATA = "kontrast.dev/generate-example-data"


@dataclass(frozen=True)
class Resolved:
    """A TrainJob resolved for running."""

    name: str
    params: Params
    spec: Mapping[str, Any]         #: the defaulted spec as written: reported in summary.json only
    base_dir: Path
    model_config: Optional[str]     #: resolved path/URL of a model config JSON, if spec.model is one
    uid: Optional[str] = None       #: metadata.uid (set in a cluster)
    annotations: Mapping[str, str] = field(default_factory=dict)


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
    model_config = None
    if spec["model"].lower().endswith(".json"):
        try:
            model_config = resolve_location(spec["model"], base_dir)
        except ValueError as exc:
            raise SpecError("model", str(exc)) from None
    return Resolved(
        name=name,
        params=Params.from_spec(spec, base_dir, output),
        spec=spec,
        base_dir=base_dir,
        model_config=model_config,
        uid=metadata.get("uid"),
        annotations=dict(metadata.get("annotations") or {}),
    )


def load_resolved(file: str, output: Optional[str] = None) -> Resolved:
    """The TrainJob in ``file``, validated like ``kontrast validate`` and resolved."""
    from kontrast.api import TrainJobInvalid, load_trainjob

    try:
        obj = load_trainjob(file)
    except TrainJobInvalid as exc:
        raise PermanentError(str(exc)) from None
    return resolve(obj, file, output=output)
