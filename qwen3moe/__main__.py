"""``python -m qwen3moe``: see cli.py."""

import sys

from .cli import main

sys.exit(main())
