"""RoundSync: turns Lightning training epochs into federated rounds.

One training epoch is one round. When Lightning asks for the epoch's training data, the server picks the
round's participants and RoundSync hands Lightning a loader that yields their local batches one client
after another. At each client boundary the client's trainable state goes to the server as an update and
the model is reset to the global state with a fresh optimizer; after the last client the server
aggregates and the global model is loaded, so Lightning's validation (every ``eval_every`` rounds)
evaluates the global model. The model stays resident; only trainable tensors are swapped.

It works with any LightningModule (parameters with ``requires_grad`` are federated) and any DataModule:
one that exposes ``client_indices`` (like ``FederatedTextDataModule``) keeps its partition, any other
has its training set split IID over ``num_clients``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Protocol

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_fedpeft.callbacks.log_table import write_log_table
from lightning_fedpeft.cost import CostModel, round_seconds
from lightning_fedpeft.launchers import EmbeddedLauncher, RoundChannel, RoundTicket
from lightning_fedpeft.launchers.rpc import MODES, RPCLauncher, distributed_env
from lightning_fedpeft.rounds import ClientSegment, RoundBatchSampler, client_seed
from lightning_fedpeft.server import RoundRecord
from lightning_fedpeft.state import COMPRESSIONS, compress, load_trainable_state, trainable_state
from lightning_fedpeft.strategy import ClientUpdate, FedAvg, Strategy

log = logging.getLogger(__name__)


class ClientHook(Protocol):
    """Per-client work an algorithm adds to every client's local round (e.g. FedARA's importance).

    RoundSync calls :meth:`on_client_start` after the client has received the global state (and got a
    fresh optimizer), and :meth:`on_client_end` after its last local step. What ``on_client_end``
    returns travels with the client's update: ``extras`` (tensors, counted in the round's bytes) and
    ``metrics`` (numbers; their mean over the round's clients joins the round's row in ``rounds.csv``).
    """

    def on_client_start(self, pl_module: pl.LightningModule) -> None: ...

    def on_client_end(self, pl_module: pl.LightningModule) -> tuple[dict[str, torch.Tensor], dict[str, float]]: ...


class RoundSync(Callback):
    """Federated rounds (sample, local training, aggregation, evaluation) on top of ``Trainer.fit``.

    Args:
        clients_per_round: participants sampled each round.
        num_clients: clients to split the training set over when the DataModule does not define
            ``client_indices`` itself (then it must be left unset or equal to their number).
        local_epochs: passes each participant makes over its local data.
        local_steps: if set, the exact number of local steps per participant (overrides ``local_epochs``).
        eval_every: evaluate the global model on the validation split every this many rounds, and after
            the last round (``trainer.max_epochs`` or ``max_sim_hours``) whatever its number.
        strategy: the server strategy; default sample-weighted ``FedAvg``.
        seed: seeds the choice of participants, the local shuffles and each client's dropout.
        mode: with several processes: ``simulation`` (the round's virtual clients are dealt to the ranks)
            or ``real`` (each rank is one client with its own data). Ignored in one process.
        round_deadline_s / liveness_timeout_s / wait_timeout_s: fault handling of the multi-process
            runtime (see :class:`~lightning_fedpeft.launchers.rpc.RPCLauncher`).
        cost_model: if set, every round also logs its simulated duration on edge devices
            (``sim_round_s``: the slowest participant's compute + download + upload) and the cumulative
            ``sim_time_h`` (see :mod:`lightning_fedpeft.cost`). Needs a Hugging Face model at ``pl_module.model``.
        compression: ``none`` or ``int8`` (both directions quantized to int8 per tensor: the download as the
            difference from the run's starting state, the upload as the difference from what the client
            received; the values carry the quantization error and the simulated transfer time uses the
            int8 size).
        launcher: where the server lives and which clients this process hosts. Default: torch.distributed
            RPC when ``WORLD_SIZE`` > 1 is set (torchrun), else this process hosts the server and all clients.
        max_sim_hours: if set (needs ``cost_model``), end ``fit`` after the first round at which the simulated
            clock ``sim_time_h`` reaches this many hours, on every process alike, so methods can be compared
            at equal simulated time; ``trainer.max_epochs`` stays a cap. A strategy that runs multi-round
            trials (FedAdapter) ends only at a decision, so its last window may pass the budget.
    """

    def __init__(
        self,
        clients_per_round: int = 10,
        num_clients: int | None = None,
        local_epochs: int = 1,
        local_steps: int | None = None,
        eval_every: int = 1,
        strategy: Strategy | None = None,
        seed: int = 0,
        mode: str = "simulation",
        round_deadline_s: float = 600.0,
        liveness_timeout_s: float = 60.0,
        wait_timeout_s: float = 1800.0,
        launcher: RoundChannel | None = None,
        cost_model: CostModel | None = None,
        compression: str = "none",
        max_sim_hours: float | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("clients_per_round", clients_per_round),
            ("local_epochs", local_epochs),
            ("eval_every", eval_every),
        ):
            if value < 1:
                raise ValueError(f"RoundSync {name}={value} must be at least 1")
        if local_steps is not None and local_steps < 1:
            raise ValueError(f"RoundSync local_steps={local_steps} must be at least 1 (or null to use local_epochs)")
        if num_clients is not None and num_clients < 1:
            raise ValueError(f"RoundSync num_clients={num_clients} must be at least 1")
        self.clients_per_round = clients_per_round
        self.num_clients = num_clients
        self.local_epochs = local_epochs
        self.local_steps = local_steps
        self.eval_every = eval_every
        self.strategy = strategy if strategy is not None else FedAvg(clients_per_round, seed=seed)
        if self.strategy.clients_per_round != clients_per_round:
            raise ValueError(
                f"RoundSync clients_per_round={clients_per_round} differs from the strategy's "
                f"{self.strategy.clients_per_round}; set them equal"
            )
        self.seed = seed
        if mode not in MODES:
            raise ValueError(f"federation.mode={mode!r} is unknown; allowed: {', '.join(MODES)}")
        if launcher is None:
            if distributed_env() is not None:
                launcher = RPCLauncher(mode, round_deadline_s, liveness_timeout_s, wait_timeout_s)
            elif mode == "real":
                raise ValueError(
                    "federation.mode='real' needs several processes (one per client): launch with torchrun, "
                    "or use mode='simulation' in one process"
                )
            else:
                launcher = EmbeddedLauncher()
        if compression not in COMPRESSIONS:
            raise ValueError(f"federation.compression={compression!r} is unknown; allowed: {', '.join(COMPRESSIONS)}")
        if max_sim_hours is not None:
            if cost_model is None:
                raise ValueError(
                    "federation.max_sim_hours needs a simulated clock: set federation.cost_model (e.g. "
                    "{class_path: lightning_fedpeft.cost.CostModel, init_args: {device: tx2}}) or drop max_sim_hours"
                )
            if not (math.isfinite(max_sim_hours) and max_sim_hours > 0):
                raise ValueError(f"federation.max_sim_hours={max_sim_hours} must be a positive number of hours")
        self.max_sim_hours = max_sim_hours
        self.cost_model = cost_model
        self.compression = compression
        self.mode = mode
        self.launcher: RoundChannel = launcher
        self.history: list[dict[str, Any]] = []
        self._ticket: RoundTicket | None = None
        self._client_indices: list[list[int]] = []
        self._dataset = None
        self._loader_kwargs: dict[str, Any] = {}
        self._patched: Any = None
        self._trainer: pl.Trainer | None = None
        self._segments: dict[int, ClientSegment] = {}
        self._ends: dict[int, ClientSegment] = {}
        self._round_open = False
        self._client: ClientSegment | None = None
        self._losses: list[float] = []
        self._client_losses: list[float] = []
        self._t_open = 0.0
        self._pending: dict[str, Any] | None = None
        self._validate_now = False  # the round just closed is evaluated (every eval_every rounds, and the last)
        self._client_sim_s = 0.0
        self._received: dict[str, torch.Tensor] = {}  # the global state as the round's clients receive it
        self._down_bytes = 0
        self._reference: dict[str, torch.Tensor] | None = None  # what int8 transfers are differences from
        self.sim_time_s = 0.0  # the simulated clock (with a cost model)
        self.client_hooks: list[ClientHook] = []  # added by algorithm callbacks in their setup
        self._hook_metrics: set[str] = set()

    # -- set-up: find the data, validate, take over the training loader --------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        source = trainer.datamodule if trainer.datamodule is not None else pl_module
        data_source = getattr(trainer.fit_loop, "_data_source", None)
        if data_source is not None and getattr(data_source, "instance", source) is not source:
            raise ValueError(
                "RoundSync needs the training data from a LightningDataModule or LightningModule.train_dataloader(); "
                "pass `datamodule=` to Trainer.fit instead of `train_dataloaders=`"
            )
        stale = source.__dict__.get("train_dataloader")
        if stale is not None and isinstance(getattr(stale, "__self__", None), RoundSync):
            # A fit that failed after another RoundSync's setup can leave its patch behind: drop it.
            source.__dict__.pop("train_dataloader")
        base = source.train_dataloader()
        if not isinstance(base, DataLoader):
            raise TypeError(
                f"RoundSync needs train_dataloader() to return a torch DataLoader, got {type(base).__name__}"
            )
        batch_size = base.batch_size if base.batch_size is not None else getattr(base.batch_sampler, "batch_size", None)
        if not batch_size:
            raise ValueError("RoundSync could not tell the training batch size from train_dataloader()")
        self._dataset = base.dataset
        self._loader_kwargs = {
            "collate_fn": base.collate_fn,
            "num_workers": base.num_workers,
            "pin_memory": base.pin_memory,
        }
        self._batch_size = int(batch_size)

        indices = getattr(source, "client_indices", None)
        channel = self.launcher
        if self.mode == "real" and channel.world_size > 1:
            # Each rank is one client (id = rank) and trains on its own data: its partition if the data
            # module has several, else all of its training set.
            if indices is not None and len(indices) not in (1, channel.world_size):
                raise ValueError(
                    f"federation.mode='real': the data module has {len(indices)} client partitions for "
                    f"{channel.world_size} ranks; set data.num_clients={channel.world_size} (one per rank) or 1"
                )
            own = list(indices[channel.rank] if indices is not None and len(indices) > 1 else range(len(self._dataset)))
            self._client_indices = [own if r == channel.rank else [] for r in range(channel.world_size)]
        elif indices is not None:
            if self.num_clients is not None and self.num_clients != len(indices):
                raise ValueError(
                    f"RoundSync num_clients={self.num_clients} differs from the data module's {len(indices)} "
                    f"client partitions; leave RoundSync num_clients unset"
                )
            self._client_indices = [list(ix) for ix in indices]
        else:
            if self.num_clients is None:
                raise ValueError(
                    "RoundSync num_clients must be set when the data module has no client_indices "
                    "(its training set is then split IID over num_clients clients)"
                )
            from lightning_fedpeft.data import partition_clients

            self._client_indices = partition_clients([0] * len(self._dataset), self.num_clients, "iid", seed=self.seed)
        n_clients = len(self._client_indices)
        self.check_num_clients(n_clients)
        if channel.world_size > 1:
            # Lightning ends fit after an epoch without batches, so every rank must train every round.
            if self.mode == "simulation" and self.clients_per_round < channel.world_size:
                raise ValueError(
                    f"federation.clients_per_round={self.clients_per_round} is below the {channel.world_size} "
                    f"ranks; every rank trains at least one client per round, so use at least {channel.world_size}"
                )
            if self.mode == "real" and self.clients_per_round != channel.world_size:
                raise ValueError(
                    f"federation.mode='real': every rank's client trains every round; set "
                    f"federation.clients_per_round={channel.world_size}"
                )
            if not channel.is_server:
                trainer.limit_val_batches = 0  # the server evaluates the global model; clients do not
                trainer.num_sanity_val_steps = 0
                if trainer.progress_bar_callback is not None:
                    trainer.progress_bar_callback.disable()  # one bar (the server's) on a shared console
        if trainer.limit_train_batches not in (1.0, None):
            raise ValueError("RoundSync needs every batch of a round: leave trainer.limit_train_batches at 1.0")
        if not pl_module.automatic_optimization:
            raise ValueError("RoundSync supports automatic optimization only (it re-creates the optimizer per client)")

        # Lightning must ask for a new loader every epoch (= round), and validate every eval_every rounds.
        trainer.reload_dataloaders_every_n_epochs = 1
        trainer.check_val_every_n_epoch = self.eval_every
        self._patched = source
        source.train_dataloader = self._round_dataloader  # instance attribute; removed in teardown
        self._num_clients = n_clients

    def check_num_clients(self, num_clients: int) -> None:
        """Raise a ``ValueError`` naming the setting if a round cannot be formed from ``num_clients``."""
        if self.clients_per_round > num_clients:
            raise ValueError(
                f"federation.clients_per_round={self.clients_per_round} exceeds the {num_clients} clients "
                f"(data.num_clients); set clients_per_round to at most {num_clients}"
            )

    def sample_batch(self) -> dict[str, torch.Tensor]:
        """A training batch of the usual size (the first examples), e.g. to count a step's FLOPs."""
        n = min(self._batch_size, len(self._dataset))
        return self._loader_kwargs["collate_fn"]([self._dataset[i] for i in range(n)])

    def mean_local_batches(self) -> float:
        """Local batches a client trains per round, averaged over the clients that have data."""
        if self.local_steps is not None:
            return float(self.local_steps)
        sizes = [len(ix) for ix in self._client_indices if len(ix)]
        return self.local_epochs * sum(math.ceil(n / self._batch_size) for n in sizes) / max(1, len(sizes))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._patched is not None:
            self._patched.__dict__.pop("train_dataloader", None)
            self._patched = None
            self.launcher.shutdown()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Leave the data module as it was found, also when fit fails (e.g. another callback's setup).
        if self._patched is not None:
            self._patched.__dict__.pop("train_dataloader", None)
            self._patched = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After any checkpoint restore, so a resumed run continues from the saved global model.
        initial = trainable_state(pl_module)
        self._reference = initial if self.compression != "none" else None
        self.launcher.stop_rule = self._budget_spent if self.max_sim_hours is not None else None
        self.launcher.start(self.strategy, self._num_clients, initial)

    # -- a round --------------------------------------------------------------------------------------
    def _round_dataloader(self) -> DataLoader:
        """Called by Lightning at the start of every epoch: open the round and lay out its batches."""
        assert self._trainer is not None
        round_idx = self._trainer.current_epoch
        self._t_open = time.perf_counter()
        self._ticket = self.launcher.begin_round(round_idx)
        # Once per round: every client of this process receives the same (possibly quantized) state.
        # int8 sends differences: down, from the run's starting state (which every client holds: the
        # pre-trained model and the seeded initialisation); up, from the state the client received.
        self._received, self._down_bytes = compress(self._ticket.global_state, self.compression, self._reference)
        sampler = RoundBatchSampler(
            self._client_indices,
            self._ticket.client_ids,
            self._batch_size,
            local_epochs=self.local_epochs,
            local_steps=self.local_steps,
            seed=self.seed,
            round_idx=round_idx,
        )
        self._segments = {s.first_batch: s for s in sampler.segments}
        self._ends = {s.last_batch: s for s in sampler.segments}
        if not sampler.segments:
            raise RuntimeError(f"rank {self.launcher.rank} has no client with data in round {round_idx}")
        self._round_open = True
        self._losses = []
        return DataLoader(self._dataset, batch_sampler=sampler, **self._loader_kwargs)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        segment = self._segments.get(batch_idx)
        if segment is None:
            return
        assert self._ticket is not None
        _load_state(pl_module, self._received)
        trainer.strategy.setup_optimizers(trainer)  # fresh optimizer (and schedulers) for every client
        # Dropout etc. depend only on (seed, round, client), wherever the client is trained.
        torch.manual_seed(client_seed(self.seed, self._ticket.round, segment.client_id))
        self._client = segment
        self._client_losses = []
        self._client_sim_s = 0.0
        for hook in self.client_hooks:
            hook.on_client_start(pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._client_losses.append(float(loss.detach()))
        if self.cost_model is not None and self._client is not None:
            model = getattr(pl_module, "model", pl_module)
            self._client_sim_s += self.cost_model.batch_seconds(
                model, batch, getattr(pl_module, "activation_cache", None)
            )
        segment = self._ends.get(batch_idx)
        if segment is None:
            return
        self._finish_client(pl_module)
        if segment is self._ends[max(self._ends)]:
            self._close_round(trainer, pl_module)

    def _finish_client(self, pl_module: pl.LightningModule) -> None:
        assert self._ticket is not None and self._client is not None
        metrics = {"train_loss": sum(self._client_losses) / len(self._client_losses)} if self._client_losses else {}
        self._losses.extend(self._client_losses)
        extras: dict[str, torch.Tensor] = {}
        for hook in self.client_hooks:
            hook_extras, hook_metrics = hook.on_client_end(pl_module)
            extras |= hook_extras
            metrics |= hook_metrics
            self._hook_metrics.update(hook_metrics)
        state, up_bytes = compress(trainable_state(pl_module), self.compression, self._received)
        if self.compression != "none":
            metrics |= {"wire_bytes_down": float(self._down_bytes), "wire_bytes_up": float(up_bytes)}
        if self.cost_model is not None:
            comm = self.cost_model.comm_seconds(self._down_bytes) + self.cost_model.comm_seconds(up_bytes)
            metrics |= {"sim_compute_s": self._client_sim_s, "sim_round_s": self._client_sim_s + comm}
        update = ClientUpdate(
            client_id=self._client.client_id,
            round=self._ticket.round,
            num_examples=self._client.num_examples,
            state=state,
            metrics=metrics,
            extras=extras,
        )
        self.launcher.submit(update)
        self._client = None

    def _close_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._ticket is not None
        state, record = self.launcher.end_round(self._ticket.round)
        _load_state(pl_module, state)
        self._round_open = False
        local_loss = sum(self._losses) / len(self._losses) if self._losses else float("nan")
        if record is None:  # a client rank: the server keeps the books
            row: dict[str, Any] = {"round": self._ticket.round, "clients": len(self._ticket.client_ids)}
            row |= {"train_loss": local_loss, "bytes_up": 0, "bytes_down": 0}
        else:
            losses = [m["train_loss"] for m in record.client_metrics.values() if "train_loss" in m]
            row = {
                "round": record.round,
                "clients": len(record.received),
                "missing": len(record.missing),
                "train_loss": sum(losses) / len(losses) if losses else local_loss,
                "bytes_up": record.bytes_up,
                "bytes_down": record.bytes_down,
            }
            clients = list(record.client_metrics.values())
            if self.compression != "none":
                for key in ("wire_bytes_down", "wire_bytes_up"):
                    row[key] = int(sum(m.get(key, 0.0) for m in clients))
            if self.cost_model is not None:
                row["sim_round_s"] = round_seconds(clients)
                self.sim_time_s = self._clock_after(record)
                row["sim_time_h"] = self.sim_time_s / 3600.0
            for key in sorted(self._hook_metrics):
                values = [m[key] for m in clients if key in m]
                if values:
                    row[key] = sum(values) / len(values)
            row |= record.extras
            if record.missing or record.rejected or record.late:
                row["missing_clients"] = " ".join(map(str, record.missing))
                row["rejected_clients"] = " ".join(map(str, record.rejected))
        if self.launcher.final_round == self._ticket.round:
            # The server's stop rule ended the run with this round; every process stops after it alike.
            trainer.should_stop = True
            if self.launcher.is_server:
                log.info(
                    "round %d: simulated clock %.4f h reached federation.max_sim_hours=%s; fit ends",
                    self._ticket.round,
                    self.sim_time_s / 3600.0,
                    self.max_sim_hours,
                )
        row["train_time_s"] = time.perf_counter() - self._t_open
        # The run's last round is evaluated too, so the logged curve ends at the model fit returns.
        self._validate_now = (row["round"] + 1) % self.eval_every == 0 or self._is_last_round(trainer)
        if self._validate_now:
            trainer.check_val_every_n_epoch = 1  # Lightning reads it after this batch, still in this epoch
        self._pending = row
        pl_module.log("round", float(row["round"]), on_step=False, on_epoch=True)
        for key in ("train_loss", "bytes_up", "bytes_down", "train_time_s"):
            pl_module.log(f"round_{key}", float(row[key]), on_step=False, on_epoch=True)
        if "sim_time_h" in row:
            pl_module.log("sim_time_h", float(row["sim_time_h"]), on_step=False, on_epoch=True)

    def _is_last_round(self, trainer: pl.Trainer) -> bool:
        assert self._ticket is not None
        if self.launcher.final_round == self._ticket.round:
            return True
        max_epochs = trainer.max_epochs
        return max_epochs is not None and max_epochs > 0 and self._ticket.round == max_epochs - 1

    def _clock_after(self, record: RoundRecord) -> float:
        """The simulated clock (seconds) once ``record``'s round is counted (server side)."""
        # A strategy that runs trials side by side keeps its own clock (extras["sim_time_s"]).
        fallback = self.sim_time_s + round_seconds(list(record.client_metrics.values()))
        return float(record.extras.get("sim_time_s", fallback))

    def _budget_spent(self, record: RoundRecord) -> bool:
        """The launcher's stop rule: the round just closed used up ``max_sim_hours``."""
        assert self.max_sim_hours is not None
        return self.strategy.may_stop() and self._clock_after(record) >= self.max_sim_hours * 3600.0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._round_open:  # the epoch stopped early (e.g. max_steps): still aggregate what was trained
            if self._client is not None:
                self._finish_client(pl_module)
            self._close_round(trainer, pl_module)
            # Lightning's validation point of this epoch has passed: only a scheduled one may have run.
            assert self._pending is not None
            self._validate_now = (self._pending["round"] + 1) % self.eval_every == 0
        if self._pending is None:
            return
        row = self._pending
        self._pending = None
        row["round_time_s"] = time.perf_counter() - self._t_open  # includes the evaluation, if any
        trainer.check_val_every_n_epoch = self.eval_every
        if self._validate_now:
            for key in ("val_acc", "val_f1", "val_loss"):
                value = trainer.callback_metrics.get(key)
                if value is not None:
                    row[key] = float(value)
        self.history.append(row)
        self._write_table(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._round_open:
            self.on_train_epoch_end(trainer, pl_module)

    def _write_table(self, trainer: pl.Trainer) -> None:
        """Keep ``rounds.csv`` (one row per round) next to the logger's files."""
        if self.launcher.is_server:
            write_log_table(trainer, "rounds.csv", self.history)

    # -- checkpointing ---------------------------------------------------------------------------------
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # The optimizer belongs to the last client and every client starts a fresh one, so its state is
        # not worth keeping; and when an algorithm changes the trainable parameters' shapes (FedAdapter
        # grows adapters, FedARA cuts ranks), the optimizer built at resume would not accept it.
        checkpoint["optimizer_states"] = []

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        clock = [row["sim_time_h"] for row in self.history if "sim_time_h" in row]
        self.sim_time_s = clock[-1] * 3600.0 if clock else 0.0


def _load_state(pl_module: pl.LightningModule, state: dict[str, torch.Tensor]) -> None:
    # A module that can change shape to fit the state (adapters of another depth/width) says so by
    # defining set_trainable_state; any other module gets a strict, in-place load.
    setter = getattr(pl_module, "set_trainable_state", None)
    if callable(setter):
        setter(state)
    else:
        load_trainable_state(pl_module, state)
