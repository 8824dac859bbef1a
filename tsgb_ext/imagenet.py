"""Deprecated: ``tsgb_ext.imagenet`` is :mod:`tsgb_ext.data.imagenet` (this spelling goes in the
next release)."""
from ._moved import alias

alias(__name__, "tsgb_ext.data.imagenet")
