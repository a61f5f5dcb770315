"""``python -m bench.ttq``: time to quality on the emulated cluster (bench.ttq.driver)."""

from bench.ttq.driver import main

if __name__ == "__main__":
    raise SystemExit(main())
