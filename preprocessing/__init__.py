"""Corpus -> shards: Ray Data preprocessing of video corpora into WebDataset latent shards."""
