"""``python -m qwen3moe``: see cli.py. Under a launcher, a process with RANK > 0 serves as a rank of a split model."""

import os
import sys

from .cli import main
from .ranks import serve

if int(os.environ.get("RANK", "0")) > 0:
    code = serve()
    sys.stdout.flush()
    os._exit(code)  # skip interpreter teardown: a communicator's destructor may wait on ranks that are gone
sys.exit(main())
