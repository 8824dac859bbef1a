"""Deprecated: ``tsgb_ext.models`` is :mod:`tsgb_ext.data.models` (this spelling goes in the
next release)."""
from ._moved import alias

alias(__name__, "tsgb_ext.data.models")
