"""The deprecated flat spellings of an earlier layout (``tsgb_ext.models`` ...): each is a
module of two lines that calls :func:`alias`."""
import importlib
import sys
import warnings


def alias(old: str, new: str) -> None:
    """Warn that ``old`` is deprecated, and make ``import old`` give the module ``new`` itself
    (the same object, so both spellings share its state)."""
    warnings.warn(f"{old} is deprecated and goes in the next release: import {new}",
                  DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)
