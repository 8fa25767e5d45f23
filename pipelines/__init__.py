"""The stages after preprocessing: train (Ray Train), generate, evaluate."""
