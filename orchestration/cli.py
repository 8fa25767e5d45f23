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


def _evaluate(args: argparse.Namespace) -> None:
    from pipelines.evaluate.run import EvaluateConfig, run_evaluation

    run_evaluation(load_config(EvaluateConfig, args.config, args.overrides))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exvideo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the main job on embedded defaults (tiny models, CPU)")
    _add_config_args(demo)
    demo.set_defaults(func=_demo)

    evaluate = commands.add_parser(
        "evaluate", help="metrics, an HTML report and MLflow runs for folders of generated videos",
        description="e.g. exvideo evaluate --set videos_dir=runs/generate/videos --set output_dir=runs/evaluate "
                    "[--set svd_dir=DIR] [--set i3d_path=i3d_torchscript.pt --set fvd_reference_dir=DIR] "
                    "[--set tracking_uri=http://127.0.0.1:5000]",
    )
    _add_config_args(evaluate)
    evaluate.set_defaults(func=_evaluate)

    tiny = commands.add_parser("make-tiny-model", help="write a tiny random SVD checkpoint in diffusers format")
    tiny.add_argument("path", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--overwrite", action="store_true")
    tiny.set_defaults(func=_make_tiny_model)
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
