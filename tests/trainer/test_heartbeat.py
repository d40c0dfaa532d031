"""report/heartbeat: the set-up's stages reach the reporters from code far from them."""

from __future__ import annotations

from kontrast.trainer.data.images import prefetch
from kontrast.trainer.report import heartbeat


class Cache:
    def load(self, location, at_least=1):
        return None


def test_the_prefetch_reports_each_image_as_it_moves_on():
    seen = []
    heartbeat.report_to(lambda stage, done, total: seen.append((stage, done, total)))
    try:
        prefetch(Cache(), [f"img{i}.jpg" for i in range(5)], list(range(5)), threads=2)
    finally:
        heartbeat.report_to(None)
    assert seen == [("Prefetching", i, 5) for i in range(6)]
    heartbeat.stage("Loading")  # no sink: nothing, no error
