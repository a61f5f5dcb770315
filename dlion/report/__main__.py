"""``python -m dlion.report RUN_DIR...``, the same as ``dlion report``."""

from dlion.report.cli import main

raise SystemExit(main())
