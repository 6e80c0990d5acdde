"""``python -m qwen3moe``: see cli.py. Under a launcher, a process with RANK > 0 serves as a rank of a split model."""

import os
import sys

from .cli import main
from .ranks import serve

if int(os.environ.get("RANK", "0")) > 0:
    serve()  # never returns: the process ends when the group does
sys.exit(main())
