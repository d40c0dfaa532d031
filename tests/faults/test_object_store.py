"""The production configuration writing its output to an object store that answers 503
SlowDown for a while (faults/flaky_store.py in front of the real SeaweedFS): the client's
retries absorb it, and the run ends with every checkpoint in the bucket."""

from __future__ import annotations

import pytest

from faults.flaky_store import FlakyStore

pytestmark = [pytest.mark.faults, pytest.mark.distributed, pytest.mark.s3]


def test_an_object_store_returning_503_for_a_while(production_job, s3):
    store = FlakyStore(s3.server.endpoint)
    try:
        out = s3.url("runs/flaky")
        job = production_job(output=out)
        run = job.launch(env={"AWS_ENDPOINT_URL": store.endpoint})
        run.diagnostics += [store.describe, lambda: s3.server.log_tail()]
        run.wait_for(lambda: s3.fs.exists(f"{s3.bucket}/runs/flaky/checkpoints/step_3.pt"), "step_3.pt in the bucket")
        store.fail(4)             # the next requests (step_6.pt's upload, a listing, ...) get 503
        assert run.finish() == 0, run.output()[-4000:]
        assert store.failed == 4 and store.relayed > 0
        names = sorted(p.rsplit("/", 1)[-1] for p in s3.fs.ls(f"{s3.bucket}/runs/flaky/checkpoints"))
        assert names == ["epoch_1.pt", "epoch_2.pt", "step_15.pt", "step_16.pt"], names
        assert run.leftovers() == []
    finally:
        store.close()
