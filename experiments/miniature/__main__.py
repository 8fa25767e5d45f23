"""`python -m experiments.miniature [--config FILE] [--set key=value ...]`: run the miniature experiment."""

import argparse

import ray

from experiments.miniature.run import MiniatureConfig, run_miniature
from exvideo.config import load_config

parser = argparse.ArgumentParser(prog="python -m experiments.miniature", description=__doc__)
parser.add_argument("--config", help="YAML file of MiniatureConfig fields")
parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
args = parser.parse_args()
config = load_config(MiniatureConfig, args.config, args.overrides)
try:
    run_miniature(config)  # each stage starts the local Ray it needs (after the VAE trains, which needs no Ray)
finally:
    ray.shutdown()
