"""``python -m sidetune.serve [NAME=]ADAPTER ... [--host --port --max-batch --max-wait-ms --max-upload-mb]``."""

import sys

from .commands import main

if __name__ == "__main__":
    sys.exit(main())
