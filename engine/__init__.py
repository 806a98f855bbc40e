"""refseg."""
