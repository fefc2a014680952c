"""smvariants: softmax variants for JAX, exact, with hand-written derivatives.

Normalizers map logits to probability vectors along an axis: :func:`softmax`,
:func:`log_softmax`, :func:`sparsemax`, :func:`entmax15`, :func:`entmax` (any alpha >= 1),
:func:`normmax` (norm entropy) and :func:`budget_sparsemax` (the capped simplex).
:mod:`smvariants.losses` has their Fenchel-Young losses, :mod:`smvariants.stats` sparsity and
entropy statistics, and :mod:`smvariants.registry` looks variants up by name.
"""

from smvariants import attention
from smvariants import losses
from smvariants import registry
from smvariants import stats
from smvariants._normalizers import budget_sparsemax
from smvariants._normalizers import entmax
from smvariants._normalizers import entmax15
from smvariants._normalizers import log_softmax
from smvariants._normalizers import normmax
from smvariants._normalizers import softmax
from smvariants._normalizers import sparsemax

__version__ = "0.1.0"

__all__ = (
    "attention",
    "budget_sparsemax",
    "entmax",
    "entmax15",
    "log_softmax",
    "losses",
    "normmax",
    "registry",
    "softmax",
    "sparsemax",
    "stats",
)
