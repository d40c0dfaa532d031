"""The production configuration against an image CDN that misbehaves (harness/image_server.py):
a redirect loop and an HTML page served with 200 are bad images (``onBadImage: skip`` drops
their rows and ``status.data`` names them); a truncated body, 503s and a trickle slower than
the fetch deadline are retried within the budget; once the server recovers, the images that
were bad are good again (nothing bad was cached)."""

from __future__ import annotations

import csv

import pytest

from faults.launched import events
from harness.image_server import ImageServer

pytestmark = [pytest.mark.faults, pytest.mark.distributed]

#: a short deadline and backoff, so the trickle and the 503s cost seconds
CONSTANTS = "kontrast.trainer.data.images:FETCH_DEADLINE_S=1;kontrast.trainer.data.images:BACKOFF_S=0.05"


def served_copy(fault_data, server: ImageServer, out) -> tuple[str, list[str]]:
    """train.csv with its images on ``server``; returns the file and the images used by one row each."""
    with open(fault_data / "train.csv", newline="") as f:
        rows = list(csv.reader(f))
    once = [img for img in {r[1] for r in rows[1:]} if sum(r[1] == img for r in rows[1:]) == 1]
    for row in rows[1:]:
        row[1] = f"{server.base}/{row[1]}"
    with open(out, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return str(out), sorted(once)


def test_misbehaving_image_server(production_job, fault_data, tmp_path):
    server = ImageServer(fault_data, trickle_s=1.0)
    try:
        train, once = served_copy(fault_data, server, tmp_path / "train-web.csv")
        loop, html, truncated, unavailable, slow = (f"/{img}" for img in once[:5])
        with open(train) as f:
            text = f.read().replace(server.base + loop, f"{server.base}/loop{loop}")
        with open(train, "w") as f:
            f.write(text)
        server.fail[html] = ["html"] * 10
        server.fail[truncated] = ["truncate"]
        server.fail[unavailable] = [503] * 3
        server.fail[slow] = ["trickle"]
        job = production_job(trainData=train, epochs=1, data={"onBadImage": "skip", "maxBadFraction": 0.1})
        run = job.launch(constants=CONSTANTS)
        assert run.finish() == 0, run.output()[-4000:]
        bad = [e for e in events(job.out) if e["event"] == "start"][0]["data"]["badImages"][0]
        assert (bad["badImages"], bad["skippedRows"]) == (2, 2), bad
        looped, served_html = (next(e for e in bad["examples"] if key in e) for key in ("/loop/", html))
        assert "redirects" in looped and "not an image" in served_html and "DOCTYPE" in served_html, bad
        assert server.hits[truncated] == 2 and server.hits[unavailable] == 4 and server.hits[slow] == 2
        assert run.leftovers() == [] and job.temp_files() == []

        # the server recovers: a new run (same node cache) fetches the HTML image again, and it is good
        server.fail.clear()
        again = production_job(name="recovered", trainData=train, epochs=1, output=str(tmp_path / "out2"),
                               data={"onBadImage": "skip", "maxBadFraction": 0.1})
        rerun = again.launch(constants=CONSTANTS)
        assert rerun.finish() == 0, rerun.output()[-4000:]
        bad = [e for e in events(again.out) if e["event"] == "start"][0]["data"]["badImages"][0]
        assert bad["badImages"] == 1 and "/loop/" in bad["examples"][0], bad
        assert rerun.leftovers() == [] and again.temp_files() == []
    finally:
        server.close()
