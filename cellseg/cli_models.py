"""The commands of models made here: synth (images to train on), train, and models (the registry's
versions and the shipped models: list, show, export, promote, rollback)."""

from __future__ import annotations

import argparse
import logging

from cellseg.cli_output import fmt, print_cell_scores, print_metrics, progress
from cellseg.cli_parser_base import SETTING, given
from cellseg.cli_settings import command_settings
from cellseg.json_values import dumps
from cellseg.redact import redact_url


def run_synth(args: argparse.Namespace) -> int:
    from cellseg.synth import write_dataset

    command_settings(args)
    ids = write_dataset(args.out, args.count, args.size, args.seed, args.bit_depth, args.polarity, args.vary_size,
                        overwrite=args.overwrite)
    print(f"wrote {len(ids)} image{'s' if len(ids) != 1 else ''} with masks and labels under {redact_url(args.out)}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from cellseg.checkpoint import load_checkpoint
    from cellseg.config import TrainConfig
    from cellseg.jobs import TrainJob, run_training
    from cellseg.jobs_training import (
        LAST_CHECKPOINT,
        MACHINE_FIELDS,
        check_can_go_on,
        check_run_dir,
        given_over,
        recorded_sources,
    )

    settings = command_settings(args)
    images, masks, training, epochs = args.images, args.masks, settings.training, settings.training.epochs
    if args.resume:  # the run's own images, masks and settings, under the flags given (run_training merges them)
        out = check_run_dir(args.out, resume=True, overwrite=False)
        last = load_checkpoint(str(out / LAST_CHECKPOINT))
        if not (images and masks):
            recorded = recorded_sources(out)
            images, masks = images or recorded[0], masks or recorded[1]
        # Only flags go over the run's settings: a settings file or variable is written for new runs
        training = TrainConfig.model_validate(given(args, SETTING).get("training", {})).model_copy(
            update={name: getattr(settings.training, name) for name in MACHINE_FIELDS})
        resumed = given_over(last.train_config, training)
        check_can_go_on(last, resumed, out)
        epochs = resumed.epochs
    elif not (images and masks):
        raise ValueError("--images and --masks are needed to start a run (only --resume takes the run's own)")
    job = TrainJob(images_url=images, masks_url=masks, registry_url=settings.registry_url,
                   model=settings.model, training=training, predict=settings.predict)
    with progress("training", "epoch", total=epochs, leave=True) as bar, \
            logging_redirect_tqdm(loggers=[logging.getLogger()]):
        def advance(record: dict[str, float]) -> None:
            bar.update(int(record["epoch"]) - bar.n)
            bar.set_postfix({k: f"{record[k]:.4f}" for k in ("train_loss", "val_dice") if k in record})

        outcome = run_training(job, args.out, resume=args.resume, on_epoch=advance, overwrite=args.overwrite)
    result = outcome.result
    print(f"{result.stop_reason}; {result.best_described}")
    print_metrics({k: v for k, v in result.best_metrics.items() if k.startswith("val_")} or result.best_metrics)
    if outcome.cells:
        print_cell_scores(outcome.cells, label=f"validation cells ({outcome.cells['images']} images, as `predict` segments them)")
    print(f"checkpoint: {result.best_checkpoint}\nhistory:    {result.history_path}")
    for picture in outcome.pictures:
        print(f"picture:    {picture}")
    return 0


def run_models(args: argparse.Namespace) -> int:
    from cellseg.bundled import DEFAULT_SHIPPED_MODEL, SHIPPED_MODELS, model_card, shipped_name
    from cellseg.model_source import suggesting_a_shipped_model
    from cellseg.registry import Registry, RegistryError, RegistryMissing

    registry_url = command_settings(args).registry_url
    registry = Registry(registry_url)
    version, checkpoint = getattr(args, "version", None), getattr(args, "checkpoint", None)
    needs_registry = args.action in ("promote", "rollback") or (
        args.action in ("show", "export") and not (checkpoint or shipped_name(version or "current")))
    if needs_registry:  # a misspelt --registry is refused as missing, not read as one without versions
        with suggesting_a_shipped_model(version if args.action in ("show", "export") else None):
            registry.check_exists()
    if args.action == "list":
        try:
            registry.check_exists()
            absent = False
        except RegistryMissing as missing:  # said, not refused: the shipped models below need no registry
            print(f"{missing}: nothing registered there")
            absent = True
        versions, unreadable = ([], {}) if absent else registry.scan()  # one damaged version never hides the others
        problems = [f"version {version}: {problem}" for version, problem in unreadable.items()]
        current = None
        try:
            current = None if absent else registry.current()
        except RegistryError as error:
            problems.append(str(error))
        if current is not None and current not in {meta.version for meta in versions} | set(unreadable):
            problems.append(registry.current_gone(current))
        if not versions and not problems and not absent:
            print(f"no models registered in {redact_url(registry_url)}")
        for meta in versions:
            marker = "*" if meta.version == current else " "
            print(f"{marker} {meta.version}  val_dice {fmt(meta.metrics.get('val_dice'))}  epoch {meta.epoch}  "
                  f"dataset {str(meta.dataset_manifest_hash)[:12]}  registered {meta.registered[:19]}")
        for problem in problems:
            print(f"! {problem}")
        print("shipped with cellseg (cellseg models show NAME):")
        for shipped, (description, _) in SHIPPED_MODELS.items():
            print(f"  {shipped}{' (default)' if shipped == DEFAULT_SHIPPED_MODEL else ''}: {description}")
    elif args.action == "show":
        card_name = shipped_name(args.version)
        if card_name:
            print(dumps(model_card(card_name), indent=1))
        else:
            with suggesting_a_shipped_model(args.version):
                meta = registry.get(args.version)
            # Where the checkpoint, its training history and pictures are, to copy or open.
            urls = {name: redact_url(registry.file_url(meta.version, name)) for name in ("checkpoint.pt", *meta.files)}
            print(dumps({**meta.model_dump(mode="json"), "urls": urls}, indent=1))
    elif args.action == "export":
        from cellseg.export import export_model
        from cellseg.model_source import ModelSource

        if args.checkpoint and args.version:
            raise ValueError(f"give a registered version ({args.version}) or --checkpoint, not both")
        with suggesting_a_shipped_model(args.version):
            checkpoint, version = ModelSource(registry_url, args.version or "current", args.checkpoint).load()
        export_model(checkpoint, args.out, args.format, model_version=version, overwrite=args.overwrite)
        print(f"exported model {version} as {args.format} to {redact_url(args.out)} (input/normalisation/threshold in {redact_url(args.out)}.json)")
    elif args.action == "rollback":
        before, now = registry.rollback()
        print(f"{now} is current again in {redact_url(registry_url)} (was {before})")
    else:
        previous = registry.promote(args.version)
        promoted = registry.resolve(args.version)
        was = ("; it already was" if previous == promoted else f" (was {previous}; `cellseg models rollback` makes "
               "it current again)" if previous else "")
        print(f"{promoted} is now current in {redact_url(registry_url)}{was}")
    return 0
