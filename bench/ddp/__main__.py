"""``python -m bench.ddp``: the DDP benchmark (bench.ddp.driver)."""

from bench.ddp.driver import main

if __name__ == "__main__":
    raise SystemExit(main())
