"""``python -m bench.netcomm``: the communication benchmark on an emulated cluster (bench.netcomm.driver)."""

from bench.netcomm.driver import main

if __name__ == "__main__":
    raise SystemExit(main())
