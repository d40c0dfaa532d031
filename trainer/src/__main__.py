"""``python -m kontrast.trainer FILE`` (torchrun's entry point in the pods): ``kontrast train``."""

import sys

from .cli.train import main

if __name__ == "__main__":
    sys.exit(main())
