"""tsgb_hooks: the pure-PyTorch TSGB backend ("pure-hook version").

Always available; the fallback of tsgb_ext, the baseline of its benchmarks, and (in float64)
the oracle of its tests. ``rules`` holds the four TSGB backward rules as functions, ``ops`` the
layers as autograd functions, ``Backend`` the interface tsgb_ext's model conversion uses (the
base class of both backends, with the capabilities they declare) and ``BACKEND`` this
package's backend object.
"""
from . import rules
from .backend import Backend
from .ops import BACKEND, HooksBackend, avg_pool2d, batch_norm, conv2d, linear, linear_rule

__all__ = ["rules", "Backend", "BACKEND", "HooksBackend", "conv2d", "batch_norm", "avg_pool2d",
           "linear", "linear_rule"]
