"""Deprecated: ``tsgb_ext.pipeline`` is :mod:`tsgb_ext.data.pipeline` (this spelling goes in the
next release)."""
from ._moved import alias

alias(__name__, "tsgb_ext.data.pipeline")
