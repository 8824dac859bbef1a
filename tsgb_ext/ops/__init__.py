"""The compiled ops: loading tsgb_ext._C (:mod:`.loader`), their fake kernels (:mod:`.fake`),
the classifier op's autograd (:mod:`.autograd`) and the native backend object (:mod:`.native`).
The lowest layer of the package: it imports nothing else of tsgb_ext."""
