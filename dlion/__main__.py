"""``python -m dlion``: the ``dlion`` command."""

from dlion.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
