"""The explainer (:mod:`.explainer`, ``TSGB``), its input checks (:mod:`.inputs`), backend
selection (:mod:`.backend`) and the per-model lock (:mod:`.modellock`). Imports only
:mod:`tsgb_ext.convert` and :mod:`tsgb_ext.ops` below it."""
