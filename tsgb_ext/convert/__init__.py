"""Converting a model for TSGB and restoring it exactly: :mod:`.conversion` (apply / restore,
the undo stack), :mod:`.layer_map` (module type -> rule), :mod:`.fusion` (fx-traced conv -> BN
-> activation blocks), :mod:`.classifier` (which Linear is the classifier), :mod:`.calls`
(binding the functional calls the rules replace). Imports nothing of tsgb_ext but itself."""
