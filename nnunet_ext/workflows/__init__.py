"""Workflows built from the layers below: compare, consensus cascade, pseudo-labelling, model selection,
subject-wise splits, the demo and challenge submissions."""
