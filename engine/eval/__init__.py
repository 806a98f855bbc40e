"""Evaluation: Dice / IoU of 2-D masks (:mod:`refseg.eval.metrics`) and of NIfTI label maps
(:mod:`refseg.eval.metrics_volume`)."""
