"""``fedpeft``: the LightningCLI front end. ``fedpeft fit --config configs/quickstart.yaml``.

Config sections: ``trainer`` (Lightning's; one epoch is one round, so ``max_epochs`` is the number of
rounds), ``model`` (:class:`FedPEFTModule`), ``data`` (:class:`FederatedTextDataModule`), ``federation``
(:class:`RoundSync`) and ``progress_bar`` (:class:`FederatedProgressBar`). After ``fit`` the final
global model is evaluated on the test split and a per-round summary is printed.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from lightning_fedpeft.callbacks import FederatedProgressBar, RoundSync
from lightning_fedpeft.data import FederatedTextDataModule
from lightning_fedpeft.devices import rank_devices
from lightning_fedpeft.errors import NoUpdateAccepted, SetupError
from lightning_fedpeft.launchers import FederationAborted
from lightning_fedpeft.loading import BaseLoading, auto_dtype
from lightning_fedpeft.module import FedPEFTModule

log = logging.getLogger(__name__)


class FedPEFTCLI(LightningCLI):
    """LightningCLI with the federation settings, linked arguments and a test pass after ``fit``."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(RoundSync, "federation")
        parser.add_lightning_class_args(FederatedProgressBar, "progress_bar")
        # Every round's end is a checkpoint (last.ckpt, written atomically by RoundSync's checkpoint IO), so
        # a run killed mid-round resumes with --ckpt_path last from the round before. At every round's end,
        # whatever eval_every: RoundSync changes when Lightning validates, and a checkpoint that waits for
        # validation would be skipped.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_on_train_epoch_end": True})
        parser.add_argument(
            "--test_after_fit", type=bool, default=True, help="Evaluate the final global model on the test split."
        )
        # The tokenizer and the task are the model's, and the number of classes comes from the data.
        parser.link_arguments("model.model_name_or_path", "data.tokenizer")
        parser.link_arguments("model.task", "data.task")  # classification or causal_lm: set once, on the model
        parser.link_arguments("data.num_labels", "model.num_labels", apply_on="instantiate")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        # `trainer.enable_progress_bar: false` means no bar, ours included (Lightning would refuse both).
        if config.get("enable_progress_bar") is False:
            callbacks = [cb for cb in callbacks if not isinstance(cb, FederatedProgressBar)]
        if config.get("enable_checkpointing") is False:  # likewise no checkpoints, ours included
            callbacks = [cb for cb in callbacks if not isinstance(cb, ModelCheckpoint)]
        try:  # under torchrun: one device per rank (its LOCAL_RANK GPU), never Lightning's DDP over all
            config = {
                **config,
                "devices": rank_devices(config.get("devices", "auto"), config.get("accelerator", "auto")),
            }
        except ValueError as err:
            _exit_with(err, 2)
        try:
            trainer = super()._instantiate_trainer(config, callbacks)
        except MisconfigurationException as err:  # a Trainer setting Lightning refuses (max_epochs=-5 ...)
            _exit_with(ValueError(f"trainer: {err}"), 2)
        _resumable(trainer)
        return trainer

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads --ckpt_path's hyper-parameters here, while it parses the arguments, before
        # any public hook: a truncated or damaged file must give one line (the file is only read).
        try:
            super()._parse_ckpt_path()
        except RuntimeError as err:
            if "PytorchStreamReader" not in str(err) and "zip archive" not in str(err):
                raise
            ckpt = (self.config.get(self.config.get("subcommand") or "", {}) or {}).get("ckpt_path")
            _exit_with(
                ValueError(f"the checkpoint {ckpt} cannot be read ({str(err).split('.')[0]}); resume from another"), 2
            )

    def before_instantiate_classes(self) -> None:
        # Settings that depend on the trainer, resolved or refused before the model's weights are read.
        config = self.config[self.subcommand] if self.subcommand else self.config
        try:
            # The federation's plain settings too: the data module splits the data when it is built, and a split
            # that fails (a data-dependent setting) must not hide a bad federation setting given with it.
            federation = config.get("federation") or {}
            RoundSync.check_settings(**{k: federation[k] for k in _PLAIN_FEDERATION if k in federation})
            check_strategy(config.trainer.get("strategy"), config.trainer.get("accelerator"))
            config.model.base_dtype = resolve_base_dtype(
                config.model.base_dtype, config.model.quantization, config.model.load_device, config.trainer
            )
        except ValueError as err:
            _exit_with(err, 2)

    def instantiate_classes(self) -> None:
        # Bad settings raise ValueError while the data module and model are built, before any training:
        # print the message (it names the setting and the fix) instead of a traceback.
        try:
            super().instantiate_classes()
        except ValueError as err:
            _exit_with(err, 2)

    def fit(self, model: Any, **kwargs: Any) -> None:
        # RoundSync checks the federation as a whole when fit sets up (SetupError), and a rank that learns
        # that another one failed stops with FederationAborted: one line each, no traceback of this rank.
        sync = RoundSync.find(self.trainer)
        if kwargs.get("ckpt_path") is not None and sync is not None and not sync.launcher.is_server:
            # Only the server's checkpoint holds the run (client ranks keep none, and often sit on other
            # machines): a client rank joins the resumed run at the server's round, with its state.
            log.info("rank %d: --ckpt_path is the server's (rank 0); this rank joins where it is", sync.launcher.rank)
            kwargs["ckpt_path"] = None
        try:
            self.trainer.fit(model, **kwargs)
        except SetupError as err:
            _exit_with(err, 2)
        except (FederationAborted, NoUpdateAccepted) as err:
            _exit_with(err, 1)
        except RuntimeError as err:
            if "PytorchStreamReader" not in str(err) and "zip archive" not in str(err):
                raise
            # torch.load on a truncated or damaged file; the file is left as it is
            where = self.trainer.ckpt_path or kwargs.get("ckpt_path")
            _exit_with(ValueError(f"the checkpoint {where} cannot be read ({err}); resume from another one"), 2)

    def after_fit(self) -> None:
        trainer = self.trainer
        results: list[dict[str, float]] = []
        sync = RoundSync.find(trainer)
        if sync is not None and not sync.launcher.is_server:
            return  # with several ranks only the server tests and reports
        if self.config_init[self.subcommand].get("test_after_fit", True) and not trainer.interrupted:
            results = trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        _print_summary(trainer, sync, results[0] if results else {})


def resolve_base_dtype(base_dtype: str, quantization: str, load_device: str, trainer: Any) -> str:
    """``model.base_dtype: auto`` made concrete from ``trainer.precision`` and ``trainer.accelerator``, so that
    the base is loaded in the dtype it trains in (see :func:`lightning_fedpeft.loading.auto_dtype`)."""
    if base_dtype != "auto":
        return base_dtype
    loading = BaseLoading("auto", quantization, load_device)
    on_gpu = str(trainer.get("accelerator") or "auto") in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    device = loading.target_device() if on_gpu else torch.device("cpu")
    return str(auto_dtype(str(trainer.get("precision") or "32-true"), device)).removeprefix("torch.")


def check_strategy(strategy: Any, accelerator: Any) -> None:
    """Refuse DeepSpeed where it cannot run (Lightning's DeepSpeed strategy needs a CUDA GPU), naming the setting."""
    name = strategy if isinstance(strategy, str) else getattr(strategy, "get", lambda *_: "")("class_path") or ""
    if "deepspeed" not in str(name).lower():
        return
    if str(accelerator or "auto") == "cpu" or not torch.cuda.is_available():
        raise ValueError(
            f"trainer.strategy={name!r}: DeepSpeed runs on CUDA GPUs only, and this process has none; "
            f"remove trainer.strategy (a CPU client trains without it)"
        )


def _resumable(trainer: Any) -> None:
    """Let `--ckpt_path last` find the previous run's checkpoint: every round's last.ckpt, in a folder that
    does not change with the logger's version (``<save_dir>/<name>/checkpoints``)."""
    logger = trainer.logger
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        if callback.save_last is None:
            callback.save_last = True
        if callback.dirpath is None and logger is not None and logger.save_dir is not None:
            callback.dirpath = os.path.join(logger.save_dir, str(logger.name or ""), "checkpoints")


def _exit_with(err: Exception, code: int) -> None:
    print(f"fedpeft: error: {err}", file=sys.stderr)
    sys.exit(code)


# RoundSync.check_settings' arguments: the federation settings checked before the data is split.
_PLAIN_FEDERATION = (
    "clients_per_round",
    "num_clients",
    "local_epochs",
    "local_steps",
    "eval_every",
    "max_empty_rounds",
)
# The summary's validation columns: a classifier's, or a decoder's (whichever the rows have).
_COLUMNS = {"val_acc": "val_acc", "val_f1": "val_f1", "val_ppl": "val_ppl", "val_exact_match": "val_em"}


def _print_summary(trainer: Any, sync: RoundSync | None, test: dict[str, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if sync is not None and sync.history:
        shown = [k for k in _COLUMNS if any(k in row for row in sync.history)] or ["val_acc", "val_f1"]
        table = Table(title="Federated rounds")
        for column in ("round", "clients", "train_loss", *(_COLUMNS[k] for k in shown), "MB up", "MB down", "seconds"):
            table.add_column(column, justify="right")
        for row in sync.history:
            table.add_row(
                str(row["round"] + 1),
                str(row["clients"]),
                f"{row['train_loss']:.3f}",
                *(f"{row[k]:.3f}" if k in row else "" for k in shown),
                f"{row['bytes_up'] / 1e6:.2f}",
                f"{row['bytes_down'] / 1e6:.2f}",
                f"{row['round_time_s']:.1f}",
            )
        console.print(table)
        up = sum(r["bytes_up"] for r in sync.history) / 1e6
        down = sum(r["bytes_down"] for r in sync.history) / 1e6
        console.print(f"traffic: {up:.1f} MB up, {down:.1f} MB down over {len(sync.history)} rounds")
    if "test_acc" in test:
        console.print(
            f"[bold]test accuracy {test.get('test_acc', float('nan')):.4f}[/bold]  "
            f"macro-F1 {test.get('test_f1', float('nan')):.4f}  (global model after the last round)"
        )
    elif "test_ppl" in test:
        match = f"  exact match {test['test_exact_match']:.4f}" if "test_exact_match" in test else ""
        console.print(
            f"[bold]test loss {test.get('test_loss', float('nan')):.4f}[/bold]  perplexity {test['test_ppl']:.2f}"
            f"{match}  (global model after the last round)"
        )
    if trainer.log_dir:
        console.print(f"logs: {trainer.log_dir}")


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``fedpeft`` console script and ``python -m lightning_fedpeft``."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["report"]:  # not a Trainer subcommand: pictures and a table from runs' logs
        from lightning_fedpeft.report import main as report

        report(argv[1:])
        return
    run_cli(args)


def _quiet_third_party_noise() -> None:
    # Keep the console about the run: drop Lightning's product tips and a torch-2.13 deprecation that
    # Lightning 2.6 triggers on every step. Only the CLI does this; the library leaves filters alone.
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")

    class _NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip")

    for handler in logging.getLogger("lightning.pytorch").handlers:
        handler.addFilter(_NoTips())
    # bitsandbytes on a CPU with AVX-512 bf16 warns at import that the optional `kernels` package is missing:
    # that package fetches its kernels from a model hub at run time, which this package never does.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _plain_progress() -> None:
    # A Rich bar prints nothing into a file (SLURM, nohup, torchrun's logs, CI) and the round table only comes
    # at the end: there, one plain line per round instead. In a terminal the bar shows progress.
    progress = logging.getLogger("lightning_fedpeft.progress")
    if sys.stderr.isatty() or progress.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s fedpeft: %(message)s", "%H:%M:%S"))
    progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    progress.propagate = False


def run_cli(args: list[str] | None = None, run: bool = True) -> FedPEFTCLI:
    """Build and run the CLI; returns it (with its trainer, model and data module) for programmatic use.

    ``run=False``: parse ``args`` (no subcommand) and build the classes only, as ``fit`` would.
    """
    _quiet_third_party_noise()
    _plain_progress()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: models and data are local
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return FedPEFTCLI(
        FedPEFTModule,
        FederatedTextDataModule,
        args=args,
        seed_everything_default=42,
        trainer_defaults={
            "max_epochs": 10,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 10,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
        },
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "Federated parameter-efficient fine-tuning (lightning-fedpeft)."},
        run=run,
    )
