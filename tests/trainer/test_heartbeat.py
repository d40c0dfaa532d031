"""report/heartbeat: the set-up's stages reach the reporters from code far from them."""

from __future__ import annotations

from PIL import Image

from kontrast.trainer.data.images import ImageCache, prefetch
from kontrast.trainer.report import heartbeat


def test_the_prefetch_reports_each_image_as_it_moves_on(tmp_path):
    images = []
    for i in range(5):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / f"img{i}.jpg")
        images.append(str(tmp_path / f"img{i}.jpg"))
    seen = []
    heartbeat.report_to(lambda stage, done, total: seen.append((stage, done, total)))
    try:
        bad = prefetch(ImageCache(tmp_path / "cache"), images, list(range(5)), threads=2)
    finally:
        heartbeat.report_to(None)
    assert bad == [] and seen == [("Prefetching", i, 5) for i in range(6)]
    heartbeat.stage("Loading")  # no sink: nothing, no error
