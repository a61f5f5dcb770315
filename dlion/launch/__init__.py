"""Entry points that start a job's worker processes."""

from dlion.launch.local import launch_local

__all__ = ["launch_local"]
