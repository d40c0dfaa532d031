"""A full output volume: the save fails at once with a named reason and exit 78 (the operator
fails the job instead of restarting it into the same full volume, where every attempt would
resume and fail at the same step), leaves no temporary file, and the checkpoints already
published stay loadable."""

from __future__ import annotations

import pytest
import torch

from faults.launched import on_small_volume, temp_files

pytestmark = [pytest.mark.faults, pytest.mark.distributed]


def test_a_full_output_volume_fails_fast_with_a_named_reason(production_job, tmp_path):
    """16 MiB: step_3.pt (about 10 MB for the tiny model with its AdamW state) fits, step_6.pt
    does not (keepCheckpoints 2 needs room for three while the newest is written)."""
    out = tmp_path / "volume"
    job = production_job(output=str(out))
    run = job.launch(prefix=on_small_volume(out, "16m"))
    assert run.finish() == 78, run.output()[-4000:]
    message = job.termination_log.read_text()
    assert message.startswith("output volume full: writing ") and "step_6.pt" in message, message
    assert "bytes are free" in message and "keepCheckpoints" in message, message
    assert "unexpected pos" not in run.output()
    assert run.leftovers() == []

    after = tmp_path / "volume.after"
    assert sorted(p.name for p in (after / "checkpoints").iterdir()) == ["step_3.pt"]
    assert torch.load(after / "checkpoints" / "step_3.pt", weights_only=True)["step"] == 3
    assert temp_files(after) == []
