"""Converting a model for TSGB and restoring it exactly: :mod:`.conversion` (the lifecycle,
the undo stack), :mod:`.patches` (the per-kind patches), :mod:`.routing` (the rules' op calls,
and a subclass's own forward routed to them), :mod:`.rewrites` (model-wide reversible
rewrites: eval mode, frozen parameters, inplace off), :mod:`.degenerate` (the
degenerate-relevance check), :mod:`.layer_map` (module type -> rule), :mod:`.fusion`
(fx-traced conv -> BN -> activation blocks), :mod:`.classifier` (which Linear is the
classifier), :mod:`.calls` (binding the functional calls the rules replace). Imports nothing of
tsgb_ext but itself."""
