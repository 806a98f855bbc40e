"""Test helpers shipped with refseg: deterministic random checkpoints in the official formats."""
