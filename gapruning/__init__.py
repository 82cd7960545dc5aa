"""gapruning: data-free pruning of pretrained networks with jitted genetic search."""

from . import convert, data, models
from .evaluate import evaluate
from .zoo import Pretrained, load, save

__all__ = ["Pretrained", "convert", "data", "evaluate", "load", "models", "save"]
__version__ = "0.1.0"
