"""The `exvideo` command line: one subcommand per stage, each driven by its typed config."""

from __future__ import annotations

import argparse
import functools
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from exvideo.config import ConfigError, StageConfig, field_table, load_config
from exvideo.console import VERBOSE_ENV, stage_log
from exvideo.ray_setup import plain_worker_lines
from exvideo.storage import StorageError, hold_folder
from orchestration.stages import STAGE, STAGES, resolve


def _run_stage(args: argparse.Namespace) -> None:
    stage = STAGE[args.command]
    config = load_config(stage.config_class(), args.config, args.overrides)
    stage.check_inputs(config)
    folder = getattr(config, stage.folder)
    with hold_folder(getattr(config, stage.held or stage.folder), f"exvideo {stage.name}"), stage_log(folder):
        result = resolve(stage.entry)(config)
    if stage.summary:
        print(resolve(stage.summary)(result))


def _run_demo(args: argparse.Namespace) -> None:
    from orchestration.demo import DemoConfig, run_demo

    run_demo(load_config(DemoConfig, args.config, args.overrides))  # run_demo quietens the console itself


def _make_tiny_model(args: argparse.Namespace) -> None:
    with stage_log(None):
        from exvideo import write_tiny_animatediff, write_tiny_svd

        write, name = {"svd": (write_tiny_svd, "SVD"),
                       "animatediff": (write_tiny_animatediff, "AnimateDiff")}[args.family]
        path = write(args.path, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote tiny {name} checkpoint to {path}")


def _make_synthetic_corpus(args: argparse.Namespace) -> None:
    from preprocessing.synthetic import write_corpus

    print(f"wrote a synthetic corpus; its manifest is {write_corpus(args.path, broken=not args.no_broken)}")


def _run_workflow(args: argparse.Namespace) -> int:
    from orchestration.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    if args.plan:
        if args.address:
            raise ValueError("--plan reads the stage folders on this machine; run it where the workdir is, "
                             "without --address")
        from orchestration.runner import plan_workflow

        print(plan_workflow(spec, start=args.start, only=args.only))
        return 0
    stage_args = [*(["--from", args.start] if args.start else []), *(["--only", args.only] if args.only else [])]
    if args.address:
        with stage_log(None, libraries=("ray",)):  # the cluster runs the stages: no model library here
            from orchestration.submit import submit_workflow

            return 0 if submit_workflow(spec, args.address, stage_args) == "SUCCEEDED" else 1
    from orchestration.runner import format_summary, run_workflow

    print(format_summary(spec, run_workflow(spec, start=args.start, only=args.only, spec_path=str(args.spec))))
    return 0


class _CommandParser(argparse.ArgumentParser):
    """A command's parser whose help ends with its config's fields. The table is made only when the help is shown:
    made at every start, it would import every config module, and the demo's numpy, for nothing."""

    config_class: Callable[[], type[StageConfig]] | None = None

    def format_help(self) -> str:
        if self.config_class is not None:
            self.epilog = field_table(self.config_class())
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exvideo", description=__doc__)
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's, MLflow's and the model libraries' informational output (always kept "
                             "in each stage folder's stage.log)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    demo = ("demo", "run the main job on embedded defaults (tiny models, CPU)",
            functools.partial(resolve, "orchestration.demo:DemoConfig"), _run_demo)
    stages = ((stage.name, stage.help, stage.config_class, _run_stage) for stage in STAGES)
    for name, help_text, config_class, func in (demo, *stages):
        description = textwrap.fill(f"{help_text}. E.g. exvideo {name} --config {name}.yaml --set key=value", 100)
        command = commands.add_parser(name, help=help_text, description=description,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
        command.config_class = config_class
        command.add_argument("--config", type=Path, help="YAML file with the config")
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help="override one config field (repeatable; nested with dots: params.num_frames=48)")
        command.set_defaults(func=func)

    workflow = commands.add_parser("run", help="run a workflow spec: preprocess -> (reshard) -> train -> generate "
                                               "-> evaluate, skipping completed stages and resuming a failed one")
    workflow.add_argument("spec", type=Path, help="workflow YAML (see configs/demo.yaml)")
    stages = workflow.add_mutually_exclusive_group()
    stages.add_argument("--from", dest="start", metavar="STAGE", help="redo STAGE and everything after it")
    stages.add_argument("--only", metavar="STAGE", help="redo only STAGE (its inputs must be complete)")
    workflow.add_argument("--address", help="submit to this Ray cluster's Jobs API (http://HEAD:8265) and stream "
                                            "the logs; default: run here with Ray started in-process")
    workflow.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a spec field (train.max_steps=10)")
    workflow.add_argument("--plan", action="store_true",
                          help="only say what the run would do: each stage's state (done, unfinished, new, in use) "
                               "and action (skip, run, resume, redo); runs nothing")
    workflow.set_defaults(func=_run_workflow)

    tiny = commands.add_parser("make-tiny-model", help="write a tiny random checkpoint (SVD or AnimateDiff) in "
                                                       "diffusers format")
    tiny.add_argument("path", type=Path)
    tiny.add_argument("--family", choices=("svd", "animatediff"), default="svd")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--overwrite", action="store_true")
    tiny.set_defaults(func=_make_tiny_model)

    synthetic = commands.add_parser("make-synthetic-corpus",
                                    help="write small real mp4 files (and broken ones) with a manifest")
    synthetic.add_argument("path", type=Path)
    synthetic.add_argument("--no-broken", action="store_true", help="leave out the deliberately broken files")
    synthetic.set_defaults(func=_make_synthetic_corpus)
    return parser


def main(argv: list[str] | None = None) -> int:
    plain_worker_lines()  # before anything imports Ray
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    # Each command reads and checks its config before it enters the quiet console (`stage_log`), which imports the
    # model libraries: a bad config or spec is refused at once, not after seconds of imports.
    try:
        return args.func(args) or 0
    except (ConfigError, ConnectionError, FileNotFoundError, FileExistsError, StorageError, ValueError) as exc:
        print(f"exvideo {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        said = f" ({exc})" if str(exc) else ""
        print(f"exvideo {args.command}: interrupted{said}. What finished is kept: rerun the same command to go on.",
              file=sys.stderr)
        return 130  # the shell's code for a command ended by Ctrl-C


if __name__ == "__main__":
    sys.exit(main())
