"""Deprecated: ``tsgb_ext.baselines`` is :mod:`tsgb_ext.evaluation.baselines` (this spelling goes in the
next release)."""
from ._moved import alias

alias(__name__, "tsgb_ext.evaluation.baselines")
