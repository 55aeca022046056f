"""Figures and tables a run writes into its directory: confusion matrices, open-set curves, embedding pictures."""
