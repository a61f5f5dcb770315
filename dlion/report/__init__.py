"""``dlion report``: training runs' report.json files to a Markdown table, a summary and plots."""

from dlion.report.cli import main

__all__ = ["main"]
