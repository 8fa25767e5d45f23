"""A miniature reproduction of ExVideo's claim on a synthetic world with known dynamics, through our own stages."""
