"""Test and smoke-run helpers shipped with refseg: deterministic random checkpoints in the official formats
(and the small models tests build from them), a synthetic pyramidal slide, synthetic 2-D images."""
