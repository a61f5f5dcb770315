"""``python -m bench.gpu``: the GPU path on one GPU (bench.gpu.driver)."""

from bench.gpu.driver import main

if __name__ == "__main__":
    raise SystemExit(main())
