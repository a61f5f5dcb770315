"""``python -m bench.comm``: the communication benchmark on one machine (bench.comm.driver)."""

from bench.comm.driver import main

if __name__ == "__main__":
    raise SystemExit(main())
