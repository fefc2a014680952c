"""smvariants: softmax variants for JAX, exact, with hand-written derivatives.

Normalizers map logits to probability vectors along an axis: :func:`softmax`,
:func:`log_softmax`, :func:`sparsemax`, :func:`entmax15` and :func:`entmax` (any alpha >= 1).
:mod:`smvariants.losses` has their Fenchel-Young losses, :mod:`smvariants.stats` sparsity and
entropy statistics, and :mod:`smvariants.registry` looks variants up by name.
"""

from smvariants import losses
from smvariants import registry
from smvariants import stats
from smvariants._entmax import entmax
from smvariants._entmax import entmax15
from smvariants._softmax import log_softmax
from smvariants._softmax import softmax
from smvariants._sparsemax import sparsemax

__version__ = "0.1.0"

__all__ = (
    "entmax",
    "entmax15",
    "log_softmax",
    "losses",
    "registry",
    "softmax",
    "sparsemax",
    "stats",
)
