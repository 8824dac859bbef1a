"""Deprecated: ``tsgb_ext.metrics`` is :mod:`tsgb_ext.evaluation.metrics` (this spelling goes in the
next release)."""
from ._moved import alias

alias(__name__, "tsgb_ext.evaluation.metrics")
