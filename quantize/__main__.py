"""``python -m quantize``: entry point; all logic lives in :mod:`quantize.cli`."""

from .cli import main

raise SystemExit(main())
