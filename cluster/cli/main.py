"""The ``shoulders`` command line. Heavy imports (torch, Ray, transformers) happen inside the commands."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cluster.cli.remote import REMOTE_COMMANDS, add_remote_commands
from engine.errors import JobError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class EnvAction(argparse.Action):
    """``--version``: print what ``shoulders env`` prints and exit."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=kwargs.get("help"))

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object, option_string: str | None = None) -> None:
        from cluster.cli.env import print_env

        print_env()
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="shoulders", description="Transfer learning at scale on Ray: one job file, laptop to cluster.")
    parser.add_argument("--version", action=EnvAction, help="print the versions and devices the engine sees (shoulders env) and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="print versions, devices, DeepSpeed ops and the Hugging Face cache the engine sees, one line each")

    train = sub.add_parser("train", help="fine-tune a pre-trained model as a job file says")
    train.add_argument("job", help="job YAML file")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.batch_size=8")
    train.add_argument("--resume", action="store_true", help="continue the run in the job's output folder from its latest checkpoint")
    train.add_argument("--compare-scratch", action="store_true", help="also train the same architecture from random weights and compare")
    train.add_argument("--verbose", action="store_true", help="show Ray's, transformers' and the workers' output on the console, not only in the run's logs/")

    validate = sub.add_parser("validate", help="run every check train runs before Ray starts (schema, model, data, resources, output), without training")
    validate.add_argument("job")
    validate.add_argument("overrides", nargs="*")
    validate.add_argument("--schema-only", action="store_true", help="check the schema only, not data, model, resources or output")
    validate.add_argument("--tune", action="store_true", help="run the checks of shoulders tune instead (trial resources, search space, an existing search)")
    validate.add_argument("--resume", action="store_true", help="check as train --resume would (a run to resume must be there)")
    validate.add_argument("--explain", action="store_true", help="print every key with its default and description")

    evaluate = sub.add_parser("eval", help="evaluate an exported model folder on a data file")
    evaluate.add_argument("model_dir", help="folder written by shoulders train (output.dir/model)")
    evaluate.add_argument("--data", required=True, help="parquet/jsonl/csv file or folder with the job's columns")

    generate = sub.add_parser("generate", help="answer prompts with an exported causal LM (merged or adapter), chat template applied")
    generate.add_argument("model_dir", help="folder written by shoulders train (output.dir/model)")
    generate.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    generate.add_argument("--prompts-file", help="one prompt per line, or .jsonl rows with prompt or messages")
    generate.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated at most per answer")
    generate.add_argument("--jsonl", action="store_true", help="print one JSON line per answer")

    merge = sub.add_parser("merge", help="fold an adapter export (output.export: adapter) into its base model: a folder plain transformers loads")
    merge.add_argument("adapter_export", help="the model folder of a run with output.export: adapter (output.dir/model)")
    merge.add_argument("out", help="new folder for the merged model")

    init = sub.add_parser("init", help="print a starter job for a task and a model (shoulders init --task causal_lm --model ORG/NAME > job.yaml)")
    init.add_argument("--task", required=True, help="what the model is adapted to do (model.task)")
    init.add_argument("--model", required=True, help="hub id or local folder (model.name)")

    tune = sub.add_parser("tune", help="search freeze depth, LR ratios and other keys; write the transfer report")
    tune.add_argument("job", help="job YAML file (its tune: section sets the search)")
    tune.add_argument("overrides", nargs="*", help="dotted key=value overrides of the base job")
    tune.add_argument("--resume", action="store_true", help="continue an interrupted search in the job's output folder")
    tune.add_argument("--address", help="submit the search to this Ray cluster's Jobs API (like `shoulders submit --command tune`)")
    tune.add_argument("--verbose", action="store_true", help="show Ray Tune's status tables and every worker's output on the console")

    data = sub.add_parser("data", help="build offline datasets")
    data.add_argument(
        "dataset", choices=["quickstart", "speech-keywords", "speech-asr", "vision-quickstart"],
        help="quickstart: fortunes topics + MiniLM weights; speech-keywords / speech-asr: espeak-ng speech + tiny speech "
             "checkpoints; vision-quickstart: MNIST digits + EfficientNet-Lite0 ImageNet weights",
    )
    data.add_argument("--out", default=None, help="output folder (default data/fortunes, data/speech/keywords, data/speech/asr or data/vision/digits)")
    data.add_argument("--models", default="models", help="folder to link (quickstart) or write (speech, vision) the model checkpoints into")
    data.add_argument("--rate", type=int, default=None, help="speech: sampling rate of the written audio (default espeak-ng's 22050)")
    data.add_argument("--format", default="csv", choices=["csv", "parquet"], help="speech: wav files + csv manifests, or audio bytes in parquet")
    data.add_argument("--takes", type=int, default=1, help="speech: utterances per word or sentence group per voice")
    add_remote_commands(sub)  # submit, status, logs, stop, list, cluster
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line, with ``key=value`` overrides allowed after the options too
    (``shoulders train JOB --compare-scratch optim.epochs=2``), which plain argparse refuses."""
    args, extra = parser.parse_known_args(argv)
    overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    unknown = [item for item in extra if item not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = [*(args.overrides or []), *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``shoulders`` console script."""
    args = parse_args(build_parser(), argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return COMMANDS[args.command](args)
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: stopped; finished checkpoints and results are kept (shoulders train JOB --resume continues)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bad row found while streaming: one line naming file and row, not Ray's tracebacks
        from cluster.ingest.rows import bad_row_in

        message = bad_row_in(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


def cmd_validate(args: argparse.Namespace) -> int:
    """Every check ``train`` (or, with ``--tune``, ``tune``) makes before Ray starts, through the same functions."""
    from engine.config.schema import field_docs, load_job

    job = load_job(args.job, args.overrides)
    if args.explain:
        for key, default, doc in field_docs():
            print(f"{key} = {default}\n    {doc}")
        return 0
    if not args.schema_only:
        if args.tune:
            from cluster.tune.search import validate_search

            job, info = validate_search(args.job, args.overrides, resume=args.resume)
        else:
            from cluster.preflight.job import preflight_checks

            info = preflight_checks(job, resume=args.resume)
        rows = ", ".join(f"{s.name} {s.num_rows} rows" for s in info.splits.values())
        print(f"data: {rows}" + (f"; labels {info.labels}" if info.labels else ""))
    checked = "schema" if args.schema_only else ("every check of shoulders tune" if args.tune else "every check of shoulders train")
    print(f"ok: {args.job} is a valid job ('{job.name}', task {job.model.task}, output {job.output_dir}; {checked})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cluster.preflight.job import preflight
    from engine.config.schema import load_job

    job = load_job(args.job, args.overrides)
    job, info = preflight(job, resume=args.resume)
    import os
    import shlex

    from cluster.run.node_loss import JOB_ARGS_ENV

    os.environ.setdefault(JOB_ARGS_ENV, shlex.join([args.job, *(args.overrides or [])]))  # the resume hint's (a submitted job's: as submitted)
    from cluster.run.console import set_verbose
    from cluster.run.start import start_run

    set_verbose(args.verbose)
    start_run(job, info)  # logs into the run folder, Ray started, the header printed
    from cluster.run.summary import print_summary
    from cluster.run.trainer import run_training

    summary = run_training(job, info)
    from cluster.run.scratch_twin import add_to_run_report, judge_run, print_verdict, train_scratch_twin, write_verdict

    scratch, search = None, None
    if args.compare_scratch or job.safeguards.compare_scratch:  # the fair twin, with its own learning rate
        scratch, search = train_scratch_twin(job, info, job.output_dir / "scratch")
    print_summary(job, summary, scratch)
    from cluster.cli.answers import print_eval_answers

    print_eval_answers(job.output_dir)  # prompt/completion and chat runs: the last evaluation's answers
    verdict = judge_run(job, info, summary.test, summary.best, scratch, search)  # also vs chance and majority
    if verdict is not None:
        print_verdict(verdict, search)
        write_verdict(job.output_dir, verdict, search)
        add_to_run_report(job.output_dir / "report.md", verdict, search)  # the same section as the search's report
    from cluster.run.trainer import copy_results

    copy_results(job)  # metrics, report, verdict to output.uri when set
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from engine.checkpoints.storage import local_folder

    with local_folder(args.model_dir) as model_dir:  # an export in object storage: a temporary download
        return evaluate_export_folder(args, model_dir)


def evaluate_export_folder(args: argparse.Namespace, model_dir: Path) -> int:
    import json

    from cluster.preflight.data import check_eval_data, read_export_job

    job, labels = read_export_job(model_dir)
    info = check_eval_data(job, labels, args.data)
    from cluster.run.trainer import ensure_ray, evaluate_export

    ensure_ray()
    metrics = evaluate_export(job, info, model_dir, split="eval")
    print(json.dumps(metrics, indent=1))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.checkpoints.storage import local_folder

    with local_folder(args.model_dir) as model_dir:  # an export in object storage: a temporary download
        return generate_from_folder(args, model_dir)


def generate_from_folder(args: argparse.Namespace, model_dir: Path) -> int:
    from cluster.cli.answers import print_answers

    if not (model_dir / "config.json").is_file() and not (model_dir / "adapter_config.json").is_file():
        raise JobError(f"'{args.model_dir}' is not an exported model (no config.json or adapter_config.json); pass output.dir/model of a run.")
    prompts = [[{"role": "user", "content": p}] for p in args.prompt]
    if args.prompts_file:
        from engine.evaluation.answers import prompts_from_file

        prompts += prompts_from_file(args.prompts_file)
    if not prompts:
        raise JobError("shoulders generate: give --prompt TEXT (repeatable) or --prompts-file FILE.")
    from engine.evaluation.answers import answers_from_export

    print_answers(prompts, answers_from_export(model_dir, prompts, args.max_new_tokens), args.jsonl)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.dataset == "vision-quickstart":
        from cluster.datagen.vision import build_digits, save_lite0

        out = args.out or "data/vision/digits"
        print(f"MNIST digits written to {out} (images/ folder and parquet): {build_digits(out)}")
        print(f"EfficientNet-Lite0 ImageNet weights converted to {save_lite0(args.models)}")
        return 0
    if args.dataset.startswith("speech-"):
        from cluster.datagen.speech import build_speech_data, save_demo_models

        kind = args.dataset.removeprefix("speech-")
        out = args.out or f"data/speech/{kind}"
        counts = build_speech_data(kind, out, rate=args.rate, fmt=args.format, takes=args.takes)
        print(f"espeak-ng {kind} written to {out}: {counts}")
        print(f"tiny speech checkpoints (random weights, built from config) in: {', '.join(map(str, save_demo_models(args.models)))}")
        return 0
    from cluster.datagen.fortunes import build_fortunes, link_minilm

    args.out = args.out or "data/fortunes"

    counts = build_fortunes(args.out)
    print(f"fortunes topics written to {args.out}: {counts}")
    print(f"model linked at {link_minilm(args.models)}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    import json

    from cluster.preflight.model import locate_model

    config = Path(args.adapter_export) / "adapter_config.json"
    if config.is_file():  # the base model is there (or cached) before torch loads: the preflight's message if not
        try:
            base = json.loads(config.read_text(encoding="utf-8"))["base_model_name_or_path"]
        except (OSError, ValueError, KeyError) as exc:
            raise JobError(f"shoulders merge: '{config}' is not a PEFT adapter config ({exc}).") from None
        locate_model(base, None)
    from engine.checkpoints.merge import merge_export

    out = merge_export(args.adapter_export, args.out)
    print(f"merged: {out} (loads with transformers' from_pretrained; shoulders eval and generate take it)")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from cluster.cli.starter import starter_job

    print(starter_job(args.task, args.model), end="")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from cluster.cli.env import print_env

    print_env()
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    if args.address:
        from cluster.cli.remote import submit_command

        return submit_command(args.job, args.overrides, args.address, command="tune", resume=args.resume)
    from cluster.run.console import set_verbose
    from cluster.tune.search import run_tune

    set_verbose(args.verbose)
    run_tune(args.job, args.overrides, resume=args.resume)
    return 0


COMMANDS = {"train": cmd_train, "validate": cmd_validate, "eval": cmd_eval, "data": cmd_data, "tune": cmd_tune, "generate": cmd_generate, "env": cmd_env, "merge": cmd_merge, "init": cmd_init}
COMMANDS.update(REMOTE_COMMANDS)

if __name__ == "__main__":
    sys.exit(main())
