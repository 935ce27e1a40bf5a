"""The arguments of the commands that run Prefect: tune, flow (train-unet, segment-images) and
serve; their functions are in `cellseg.cli_flows`."""

from __future__ import annotations

import argparse

from cellseg.cli_parser_base import DRY_RUN_HELP, EXIT_STATUS_HELP, JOB, add_command, add_pairs
from cellseg.cli_parser_flags import (
    MODEL_FLAGS,
    PREDICT_FLAGS,
    REGISTRY_FLAG,
    SEGMENT_JOB_FLAGS,
    TRAIN_JOB_FLAGS,
    TRAINING_FLAGS,
    TUNE_JOB_FLAGS,
    add_flags,
)
from cellseg.job_config import SegmentJob, TrainJob, TuneJob


def add_tune(commands: argparse._SubParsersAction) -> None:
    """`cellseg tune`: the tune-unet flow run here."""
    tune = add_command(commands, "tune", "tune",
                       help="search hyper-parameters: train trials in parallel (tune-unet flow), register the best",
                       description="Runs the tune-unet Prefect flow here: trains TRIALS points of the grid the value "
                                   "lists span (each with early stopping), registers the best by validation Dice and "
                                   "prints every trial.")
    add_pairs(tune)
    add_flags(tune, [REGISTRY_FLAG])
    add_flags(tune, TUNE_JOB_FLAGS, JOB, TuneJob)
    tune.add_argument("--training-json", default="{}",
                      help='other TrainConfig fields for every trial as JSON, e.g. \'{"epochs": 20}\'; the search '
                           'sets learning_rate, loss, augmentation and border_weight (given ones are said and not '
                           'used), and every trial trains from scratch (init_from is refused)')


def add_flow(commands: argparse._SubParsersAction) -> None:
    """`cellseg flow` and its flows: train-unet, segment-images."""
    flow = add_command(commands, "flow", help="run a Prefect flow (train-unet, segment-images) from here")
    flows = flow.add_subparsers(dest="flow", required=True, metavar="FLOW")
    flow_train = add_command(flows, "train-unet", "flow_train", help="ingest, train, evaluate and register a model")
    add_pairs(flow_train)
    add_flags(flow_train, [REGISTRY_FLAG])
    add_flags(flow_train, TRAIN_JOB_FLAGS, JOB, TrainJob)
    add_flags(flow_train, TRAINING_FLAGS + MODEL_FLAGS)
    flow_train.add_argument("--model-json", default="{}",
                            help='ModelConfig fields as JSON, e.g. \'{"base_width": 8}\', over the settings\' model '
                                 'section')
    flow_train.add_argument("--training-json", default="{}",
                            help='TrainConfig fields as JSON, e.g. \'{"epochs": 5}\', over the settings\' training '
                                 'section')
    segment = add_command(flows, "segment-images", "flow_segment",
                          help="segment new images in parallel shards into a store", epilog=EXIT_STATUS_HELP)
    segment.add_argument("--source", required=True, help="directory URL of images, or one image file")
    segment.add_argument("--store", required=True, help="zarr results store URL")
    segment.add_argument("--dry-run", action="store_true", help=DRY_RUN_HELP + " (nor starting Prefect)")
    add_flags(segment, [REGISTRY_FLAG])
    add_flags(segment, SEGMENT_JOB_FLAGS, JOB, SegmentJob)
    add_flags(segment, PREDICT_FLAGS)


def add_serve(commands: argparse._SubParsersAction) -> None:
    """`cellseg serve`: the deployments served from here."""
    serve = add_command(
        commands, "serve", "serve", help="serve the train-unet, tune-unet, nightly-segmentation and backfill deployments",
        description="Registers the four deployments of deployments/prefect.yaml with the Prefect API (PREFECT_API_URL) "
                    "and runs their flow runs from here (each in a process of its own) until stopped; stopping it pauses their schedules, and "
                    "the next serve resumes them. Without --nightly-source and --nightly-store (given together) the "
                    "nightly run reads its job from the Prefect variable cellseg_nightly when it starts. Refused "
                    "where `prefect deploy` registered the same deployments for a work pool: those run on its "
                    "workers. Ctrl-C or SIGTERM stop it with exit status 0, a service's normal end.")
    serve.add_argument("--nightly-source", default=None, help="image directory URL for nightly-segmentation")
    serve.add_argument("--nightly-store", default=None, help="store URL for nightly-segmentation")
    serve.add_argument("--nightly-model-version", default=None, metavar="VERSION",
                       help="with --nightly-source and --nightly-store, the nightly run's model: a registered version, "
                            "'current', or a shipped model ('bundled', 'nuclei', 'general') (default: the registry's "
                            "current one)")
    serve.add_argument("--cron", default=None, help="nightly schedule (default: the one in deployments/prefect.yaml)")
