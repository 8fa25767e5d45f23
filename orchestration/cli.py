"""The `exvideo` command line: one subcommand per stage, each driven by its typed config."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from orchestration.config import ConfigError, load_config

# subcommand -> (module, config class, run function, summary formatter or None, help), in data-flow order.
# Modules import lazily, so `exvideo --help` stays fast.
STAGES = {
    "demo": ("orchestration.demo", "DemoConfig", "run_demo", None,
             "run the main job on embedded defaults (tiny models, CPU)"),
    "preprocess": ("preprocessing.run", "PreprocessConfig", "run_preprocess", "format_summary",
                   "corpus -> WebDataset latent shards on Ray Data (resumable); "
                   "required: input=MANIFEST_OR_FOLDER output=DIR model=SVD_DIR"),
    "reshard": ("preprocessing.reshard", "ReshardConfig", "run_reshard", "format_reshard_summary",
                "filter, shuffle and rewrite a shard set into shards of a new size; required: input=SHARDS output=DIR"),
    "train": ("pipelines.train", "TrainConfig", "run_training", None,
              "post-tune the temporal modules on latent shards (Ray Train)"),
    "generate": ("pipelines.generate", "GenerateJobConfig", "run_generate_job", None,
                 "batch-generate long videos from a listing of images or prompts"),
    "evaluate": ("pipelines.evaluate.run", "EvaluateConfig", "run_evaluation", None,
                 "metrics, an HTML report and MLflow runs for folders of generated videos"),
}


def _run_stage(args: argparse.Namespace) -> None:
    module_name, config_name, run_name, formatter, _ = STAGES[args.command]
    module = importlib.import_module(module_name)
    result = getattr(module, run_name)(load_config(getattr(module, config_name), args.config, args.overrides))
    if formatter:
        print(getattr(module, formatter)(result))


def _make_tiny_model(args: argparse.Namespace) -> None:
    from exvideo import write_tiny_svd

    print(f"wrote tiny SVD checkpoint to {write_tiny_svd(args.path, seed=args.seed, overwrite=args.overwrite)}")


def _make_synthetic_corpus(args: argparse.Namespace) -> None:
    from preprocessing.synthetic import write_corpus

    print(f"wrote a synthetic corpus; its manifest is {write_corpus(args.path, broken=not args.no_broken)}")


def _run_workflow(args: argparse.Namespace) -> int:
    from orchestration.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    stage_args = [*(["--from", args.start] if args.start else []), *(["--only", args.only] if args.only else [])]
    if args.address:
        from orchestration.submit import submit_workflow

        return 0 if submit_workflow(spec, args.address, stage_args) == "SUCCEEDED" else 1
    from orchestration.runner import format_summary, run_workflow

    print(format_summary(spec, run_workflow(spec, start=args.start, only=args.only, spec_path=str(args.spec))))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exvideo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (*_, help_text) in STAGES.items():
        stage = commands.add_parser(name, help=help_text,
                                    description=f"{help_text}. Fields: see the stage's config class; e.g. "
                                                f"exvideo {name} --config {name}.yaml --set key=value")
        stage.add_argument("--config", type=Path, help="YAML file with the stage's config")
        stage.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="override one config field (repeatable; nested with dots: params.num_frames=48)")
        stage.set_defaults(func=_run_stage)

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
    workflow.set_defaults(func=_run_workflow)

    tiny = commands.add_parser("make-tiny-model", help="write a tiny random SVD checkpoint in diffusers format")
    tiny.add_argument("path", type=Path)
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
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"exvideo {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
