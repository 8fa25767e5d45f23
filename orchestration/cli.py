"""The `exvideo` command line: one subcommand per stage, each driven by its typed config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orchestration.config import ConfigError, load_config


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file with the stage's config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field (repeatable), e.g. --set num_frames=48")


def _demo(args: argparse.Namespace) -> None:
    from orchestration.demo import DemoConfig, run_demo

    run_demo(load_config(DemoConfig, args.config, args.overrides))


def _make_tiny_model(args: argparse.Namespace) -> None:
    from exvideo import write_tiny_svd

    print(f"wrote tiny SVD checkpoint to {write_tiny_svd(args.path, seed=args.seed, overwrite=args.overwrite)}")


def _preprocess(args: argparse.Namespace) -> None:
    from preprocessing.config import PreprocessConfig
    from preprocessing.run import format_summary, run_preprocess

    print(format_summary(run_preprocess(load_config(PreprocessConfig, args.config, args.overrides))))


def _reshard(args: argparse.Namespace) -> None:
    from preprocessing.reshard import ReshardConfig, format_reshard_summary, run_reshard

    print(format_reshard_summary(run_reshard(load_config(ReshardConfig, args.config, args.overrides))))


def _make_synthetic_corpus(args: argparse.Namespace) -> None:
    from preprocessing.synthetic import write_corpus

    print(f"wrote a synthetic corpus; its manifest is {write_corpus(args.path, broken=not args.no_broken)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exvideo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the main job on embedded defaults (tiny models, CPU)")
    _add_config_args(demo)
    demo.set_defaults(func=_demo)

    tiny = commands.add_parser("make-tiny-model", help="write a tiny random SVD checkpoint in diffusers format")
    tiny.add_argument("path", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--overwrite", action="store_true")
    tiny.set_defaults(func=_make_tiny_model)

    stages = {
        "preprocess": (_preprocess, "corpus -> WebDataset latent shards on Ray Data (resumable)",
                       "Encode a video corpus into WebDataset shards of VAE latents and CLIP embeddings. Required: "
                       "--set input=MANIFEST_OR_FOLDER --set output=DIR --set model=SVD_DIR. Rerunning resumes."),
        "reshard": (_reshard, "filter, shuffle and rewrite a shard set into shards of a new size",
                    "Required: --set input=SHARD_SET --set output=DIR. Filters: motion_bucket_min/max, "
                    "sources=[globs], require_caption, keys_file; shuffle_seed; shard_max_samples/bytes."),
    }
    for name, (func, summary, description) in stages.items():
        stage = commands.add_parser(name, help=summary, description=description)
        _add_config_args(stage)
        stage.set_defaults(func=func)

    synthetic = commands.add_parser("make-synthetic-corpus",
                                    help="write small real mp4 files (and broken ones) with a manifest")
    synthetic.add_argument("path", type=Path)
    synthetic.add_argument("--no-broken", action="store_true", help="leave out the deliberately broken files")
    synthetic.set_defaults(func=_make_synthetic_corpus)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"exvideo {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
