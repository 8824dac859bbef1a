"""Deprecated: ``tsgb_ext.quantus`` is :mod:`tsgb_ext.evaluation.quantus` (this spelling goes in the
next release)."""
from ._moved import alias

alias(__name__, "tsgb_ext.evaluation.quantus")
