"""``python -m bench.project``: the cost-model projection to large clusters (bench.project.driver)."""

from bench.project.driver import main

if __name__ == "__main__":
    raise SystemExit(main())
