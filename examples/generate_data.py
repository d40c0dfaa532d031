"""Generate the synthetic product-search data set used by examples/trainjob.yaml.

    python examples/generate_data.py [FOLDER]      (default: examples/data)

Writes train.csv, eval.csv and images/ (deterministic: the same files every time). You rarely
need this by hand: `kontrast train examples/trainjob.yaml` generates the data on first use
because the TrainJob carries the annotation kontrast.dev/generate-example-data: "true".
"""

import sys
from pathlib import Path

from kontrast.trainer.data.example_data import generate

if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "data"
    print(f"example data in {generate(folder)}")
