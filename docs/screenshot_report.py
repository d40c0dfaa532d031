"""Render a run's report.html in headless Chromium and save a small PNG (docs/report.png).

    python docs/screenshot_report.py examples/runs/product-search [docs/report.png]

Rewrites the report from the run's files first (kontrast report), then shrinks the
screenshot to a 256-colour PNG so the committed image stays small.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from kontrast.trainer.ship.report_page import write_report


def main(output: str, target: str = "docs/report.png", width: int = 1200, height: int = 2000) -> None:
    write_report(output)
    browser = shutil.which("chromium") or sys.exit("chromium is missing: run `make chromium`")
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "shot.png"
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={tmp}/profile", f"--window-size={width},{height}",
                        f"--screenshot={shot}", (Path(output) / "report.html").resolve().as_uri()],
                       check=True, capture_output=True)
        image = Image.open(shot).convert("RGB")
    image = image.resize((width * 3 // 4, height * 3 // 4), Image.LANCZOS)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
    print(f"{target}: {Path(target).stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main(*sys.argv[1:])
