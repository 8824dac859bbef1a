"""Scoring saliency maps: the field's metrics (:mod:`.metrics`), baseline methods
(:mod:`.baselines`), the grid and VOC pointing benchmarks (:mod:`.benchmarks`), and adapters
for Quantus (:mod:`.quantus`) and Captum (:mod:`.captum`)."""
