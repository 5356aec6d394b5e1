"""Runtime: generation over the exported graphs."""
