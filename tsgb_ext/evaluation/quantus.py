"""Quantus integration: ``explain_func`` with Quantus's calling convention.

    import quantus
    from tsgb_ext.evaluation.quantus import explain_func
    metric = quantus.PointingGame()
    scores = metric(model=model, x_batch=x, y_batch=y, s_batch=masks,
                    explain_func=explain_func, explain_func_kwargs={"method": "tsgb"})

Quantus itself is not needed to import this module. See
:func:`tsgb_ext.evaluation.metrics.explain_func`.
"""
from .metrics import explain_func

__all__ = ["explain_func"]
