"""gapruning: data-free pruning of pretrained networks with jitted genetic search."""

from . import convert, data, fitness, models, recover, search
from .compact import compact, param_count
from .config import PruneConfig
from .encoding import Budget, ProfileEncoding, UnitEncoding, WeightEncoding
from .evaluate import evaluate
from .forward import masked_apply, population_apply
from .probes import make_probes
from .prune import PruneResult, prune
from .space import MaskError, PruneSpace
from .zoo import Pretrained, load, save

__all__ = [
    "Budget",
    "MaskError",
    "Pretrained",
    "PruneConfig",
    "ProfileEncoding",
    "PruneResult",
    "PruneSpace",
    "UnitEncoding",
    "WeightEncoding",
    "compact",
    "convert",
    "data",
    "evaluate",
    "fitness",
    "load",
    "make_probes",
    "masked_apply",
    "models",
    "param_count",
    "population_apply",
    "prune",
    "recover",
    "save",
    "search",
]
__version__ = "0.1.0"
