"""Deprecated: ``tsgb_ext.captum`` is :mod:`tsgb_ext.evaluation.captum` (this spelling goes in the
next release)."""
from ._moved import alias

alias(__name__, "tsgb_ext.evaluation.captum")
