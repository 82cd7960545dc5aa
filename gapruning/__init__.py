"""gapruning: data-free pruning of pretrained networks with jitted genetic search."""

from . import convert, data, models
from .compact import compact, param_count
from .encoding import Budget, ProfileEncoding, UnitEncoding, WeightEncoding
from .evaluate import evaluate
from .forward import masked_apply, population_apply
from .space import MaskError, PruneSpace
from .zoo import Pretrained, load, save

__all__ = [
    "Budget",
    "MaskError",
    "Pretrained",
    "ProfileEncoding",
    "PruneSpace",
    "UnitEncoding",
    "WeightEncoding",
    "compact",
    "convert",
    "data",
    "evaluate",
    "load",
    "masked_apply",
    "models",
    "param_count",
    "population_apply",
    "save",
]
__version__ = "0.1.0"
