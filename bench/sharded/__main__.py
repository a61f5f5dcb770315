"""``python -m bench.sharded``: the sharded benchmark (bench.sharded.driver)."""

from bench.sharded.driver import main

if __name__ == "__main__":
    raise SystemExit(main())
