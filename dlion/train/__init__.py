"""The main job: a byte-level transformer trained on the Python standard library's source.

Run by ``dlion train --workers N`` (local processes) or by
``torchrun --nproc-per-node N -m dlion.train`` (your own launcher).
"""

from dlion.train.args import parse_config
from dlion.train.config import TrainConfig
from dlion.train.loop import main, train

__all__ = ["TrainConfig", "main", "parse_config", "train"]
