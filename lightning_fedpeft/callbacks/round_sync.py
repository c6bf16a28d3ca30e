"""RoundSync: turns Lightning training epochs into federated rounds.

One training epoch is one round. When Lightning asks for the epoch's training data, the server plans the
round and RoundSync hands Lightning a loader that yields its clients' local batches one client after
another. At each client boundary the client's trainable state goes to the server as an update and the
model is reset to the global state with a fresh optimizer; after the last client the server aggregates
and the global model is loaded, so Lightning's validation (every ``eval_every`` rounds) evaluates the
global model. The model stays resident; only trainable tensors are swapped.

RoundSync is the Lightning glue only: the messages are in :mod:`lightning_fedpeft.protocol`, the server
and its stop rule in :mod:`lightning_fedpeft.server`, the transport and its compression in
:mod:`lightning_fedpeft.launchers`, the algorithms behind :mod:`lightning_fedpeft.algorithm`, the round
in progress in :mod:`lightning_fedpeft.rounds`, the data in :mod:`~lightning_fedpeft.callbacks.client_data`
and the table in :mod:`~lightning_fedpeft.callbacks.round_log`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_fedpeft.aggregation import Aggregator, ServerOptimizer
from lightning_fedpeft.algorithm import FederatedAlgorithm, FederatedRun, configure_algorithms, load_state
from lightning_fedpeft.callbacks.client_data import ClientData
from lightning_fedpeft.callbacks.round_log import RoundLog, empty_rounds, refusals
from lightning_fedpeft.callbacks.zero_reset import deepspeed_stage, prepare_deepspeed, reset_zero_optimizer
from lightning_fedpeft.checkpoint import AtomicCheckpointIO
from lightning_fedpeft.cost import CostModel, check_memory, check_priceable, priced_model
from lightning_fedpeft.devices import check_precision
from lightning_fedpeft.errors import NoUpdateAccepted, SetupError
from lightning_fedpeft.launchers import FederationAborted, RoundChannel, TransportConfig, make_launcher
from lightning_fedpeft.protocol import TrainableState
from lightning_fedpeft.rounds import LocalRound, check_local_work, client_seed
from lightning_fedpeft.server import FederatedServer
from lightning_fedpeft.state import host_trainable_state, to_host
from lightning_fedpeft.strategy import Strategy

log = logging.getLogger(__name__)
TRANSPORT = TransportConfig()  # the transport's defaults, written once (launchers/settings.py)


class RoundSync(Callback):
    """Federated rounds (plan, local training, aggregation, evaluation) on top of ``Trainer.fit``.

    Args:
        clients_per_round: participants per round (the strategy is built with it).
        num_clients: clients to split the training set over when the DataModule does not define
            ``client_indices`` itself (then it must be left unset or equal to their number).
        local_epochs: passes each participant makes over its local data.
        local_steps: if set, the exact number of local steps per participant (overrides ``local_epochs``).
            A strategy's per-client instructions ``local_steps`` / ``local_epochs`` override both.
        eval_every: evaluate the global model on the validation split every this many rounds, and after
            the last round (``trainer.max_epochs`` or ``max_sim_hours``) whatever its number.
        strategy: the server strategy; default: the one an algorithm callback brings, else FedAvg.
        seed: seeds the choice of participants, the local shuffles and each client's dropout.
        mode / compression / round_deadline_s / liveness_timeout_s / wait_timeout_s / heartbeat_s: the
            transport (several processes: ``simulation`` or ``real``; the codec ``none`` or ``int8``; fault
            handling of the multi-process runtime), checked and documented, with their defaults, in
            :class:`~lightning_fedpeft.launchers.TransportConfig`.
        launcher: where the server lives and which clients this process hosts. Default: torch.distributed
            RPC when ``WORLD_SIZE`` > 1 is set (torchrun), else this process hosts the server and all clients.
        cost_model: if set, clients count their simulated compute on edge devices and the server their
            transfers; every round logs ``sim_round_s`` (its slowest participant) and the clock
            ``sim_time_h`` (see :mod:`lightning_fedpeft.cost`). Needs a Hugging Face model at ``pl_module.model``.
        max_sim_hours: if set (needs ``cost_model``), end ``fit`` after the first round at which the simulated
            clock reaches this many hours, on every process alike; ``trainer.max_epochs`` stays a cap. A
            strategy that runs multi-round trials (FedAdapter) ends only at a decision.
        aggregator: how the server combines updates (:mod:`lightning_fedpeft.aggregation`): ``WeightedMean``
            (default), ``CoordinateMedian``, ``TrimmedMean``, ``NormBounded`` or ``DPGaussian`` (client-level
            differential privacy; the run ends at its epsilon budget).
        server_optimizer: a step from the combined state: ``FedAvgM``, ``FedAdam``, ``FedYogi``, ``FedAdagrad``.
        max_empty_rounds: stop with :class:`~lightning_fedpeft.errors.NoUpdateAccepted` after this many rounds
            in a row in which the server accepted no update (each such round is also a warning and a
            progress-line notice, with every client's reason); ``0``: never stop for that.
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
        mode: str = TRANSPORT.mode,
        round_deadline_s: float = TRANSPORT.round_deadline_s,
        liveness_timeout_s: float = TRANSPORT.liveness_timeout_s,
        wait_timeout_s: float = TRANSPORT.wait_timeout_s,
        launcher: RoundChannel | None = None,
        cost_model: CostModel | None = None,
        compression: str = TRANSPORT.compression,
        max_sim_hours: float | None = None,
        aggregator: Aggregator | None = None,
        server_optimizer: ServerOptimizer | None = None,
        heartbeat_s: float = TRANSPORT.heartbeat_s,
        max_empty_rounds: int = 3,
    ) -> None:
        super().__init__()
        self.check_settings(clients_per_round, num_clients, local_epochs, local_steps, eval_every, max_empty_rounds)
        FederatedServer.check_budget(max_sim_hours, cost_model)
        if launcher is not None and compression != "none":
            raise ValueError("RoundSync: give compression to the launcher you pass (its codec), not to RoundSync")
        self.clients_per_round, self.num_clients, self.seed = clients_per_round, num_clients, seed
        self.local_epochs, self.local_steps, self.eval_every = local_epochs, local_steps, eval_every
        self.cost_model, self.max_sim_hours = cost_model, max_sim_hours
        self.aggregator, self.server_optimizer = aggregator, server_optimizer
        self.max_empty_rounds = max_empty_rounds
        self._refusals: dict[int, str] = {}  # per round the server accepted nothing in: why
        # Checked even when a launcher is given: a bad setting is refused either way.
        transport = TransportConfig(
            mode=mode,
            compression=compression,
            round_deadline_s=round_deadline_s,
            liveness_timeout_s=liveness_timeout_s,
            wait_timeout_s=wait_timeout_s,
            heartbeat_s=heartbeat_s,
        )
        self.launcher = launcher or make_launcher(transport)
        self._given_strategy = strategy
        self.strategy: Strategy | None = strategy  # the run's strategy, known once fit has set up
        self.algorithms: tuple[FederatedAlgorithm, ...] = ()
        self.round_log = RoundLog()
        self._owner: FederatedAlgorithm | None = None  # the algorithm whose strategy runs (answers its queries)
        self._data: ClientData | None = None
        self._trainer: pl.Trainer | None = None
        self._round: LocalRound | None = None  # the round open on this process
        self._row: dict[str, Any] | None = None  # the round just closed, completed at the epoch's end
        self._validate_now = False
        self._reference: TrainableState | None = None  # the run's starting state, the codec's reference

    @staticmethod
    def check_settings(
        clients_per_round: int = 10,
        num_clients: int | None = None,
        local_epochs: int = 1,
        local_steps: int | None = None,
        eval_every: int = 1,
        max_empty_rounds: int = 3,
    ) -> None:
        """``ValueError`` naming the first bad plain setting. The CLI calls it before the data is split, so a
        bad federation setting is named even where the data could not be split either."""
        for name, value in (("clients_per_round", clients_per_round), ("eval_every", eval_every)):
            if value < 1:
                raise ValueError(f"RoundSync {name}={value} must be at least 1")
        if isinstance(max_empty_rounds, bool) or not isinstance(max_empty_rounds, int) or max_empty_rounds < 0:
            raise ValueError(
                f"RoundSync max_empty_rounds={max_empty_rounds!r} must be a whole number >= 0 (0: never stop)"
            )
        if num_clients is not None and num_clients < 1:
            raise ValueError(f"RoundSync num_clients={num_clients} must be at least 1 (or unset)")
        check_local_work(local_epochs, local_steps, "RoundSync ")

    @staticmethod
    def find(trainer: pl.Trainer) -> RoundSync | None:
        """The Trainer's RoundSync, if it has one."""
        return next((cb for cb in trainer.callbacks if isinstance(cb, RoundSync)), None)

    @property
    def history(self) -> list[dict[str, Any]]:
        """One row per round (what ``rounds.csv`` holds)."""
        return self.round_log.rows

    # -- set-up: the data, the algorithms and their strategy, checked together ----------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        try:
            self._setup(trainer, pl_module)
        except ValueError as err:  # a setting the run cannot work with: say so before any work
            raise SetupError(str(err)) from err

    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.limit_train_batches not in (1.0, None):
            raise ValueError("RoundSync needs every batch of a round: leave trainer.limit_train_batches at 1.0")
        if not pl_module.automatic_optimization:
            raise ValueError("RoundSync supports automatic optimization only (it re-creates the optimizer per client)")
        if trainer.world_size > 1:
            raise ValueError(
                f"RoundSync federates one device per process, and trainer.devices={trainer.num_devices} starts "
                f"Lightning's DDP: set trainer.devices=1, and start several processes with torchrun (each rank a "
                f"client process, on its own LOCAL_RANK GPU)"
            )
        check_precision(str(trainer.precision), trainer.strategy.root_device)
        channel = self.launcher
        self._data = data = ClientData.take_over(trainer, pl_module, self.num_clients, channel, self.seed, RoundSync)
        prepare_deepspeed(trainer.strategy, data.batch_size)
        if self.cost_model is not None:
            check_priceable(pl_module, data.sample_batch())  # before any algorithm counts on it
            self.cost_model.bind(data.num_clients, self.seed)  # deals a fleet: checked before any training
        run = FederatedRun(
            trainer=trainer,
            pl_module=pl_module,
            clients_per_round=self.clients_per_round,
            num_clients=data.num_clients,
            seed=self.seed,
            cost_model=self.cost_model,
            algorithms=tuple(cb for cb in trainer.callbacks if isinstance(cb, FederatedAlgorithm)),
            sample_batch=data.sample_batch,
            mean_local_batches=lambda: data.mean_local_batches(self.local_epochs, self.local_steps),
        )
        self._owner, self.strategy = configure_algorithms(run, self._given_strategy)
        self.algorithms = run.algorithms
        if self.aggregator is not None:  # the strategy takes them, or says why it cannot
            self.strategy.use_aggregator(self.aggregator)
        if self.server_optimizer is not None:
            self.strategy.use_server_optimizer(self.server_optimizer)
        self.strategy.validate(data.num_clients)
        if self.cost_model is not None and self.cost_model.client_devices:
            if not any(a.sizes_per_client for a in self.algorithms):  # else the algorithm checks its smallest
                model = priced_model(pl_module)
                check_memory(self.cost_model, model, _on(data.sample_batch(), pl_module), "the global configuration")
        channel.check_round_size(self.clients_per_round)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a kill mid-write must not break last.ckpt
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if not channel.is_server:
            for callback in trainer.checkpoint_callbacks:  # the server's checkpoint holds the run
                if isinstance(callback, ModelCheckpoint):
                    callback.save_top_k, callback.save_last = 0, False
            trainer.limit_val_batches = 0  # the server evaluates the global model; clients do not
            trainer.num_sanity_val_steps = 0
            if trainer.progress_bar_callback is not None:
                trainer.progress_bar_callback.disable()  # one bar (the server's) on a shared console
        # A client ends in its last batch's on_train_batch_end: behind every other callback (but the
        # checkpoints, which Lightning keeps last), so that they have all seen that batch by then. A new
        # list, so the setup loop running now is not disturbed.
        others = [cb for cb in trainer.callbacks if cb is not self]
        checkpoints = [cb for cb in others if isinstance(cb, Checkpoint)]
        trainer.callbacks = [cb for cb in others if cb not in checkpoints] + [self] + checkpoints
        # Lightning must ask for a new loader every epoch (= round), and validate every eval_every rounds.
        trainer.reload_dataloaders_every_n_epochs = 1
        trainer.check_val_every_n_epoch = self.eval_every
        self._trainer = trainer
        data.serve(self._round_dataloader)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After any checkpoint restore, so a resumed run continues from the saved global model.
        assert self.strategy is not None and self._data is not None
        initial = host_trainable_state(pl_module)  # the server's state lives on the CPU, whatever the device
        if self._reference is None:  # not resumed: int8 downloads are differences from this state
            self._reference = initial
        server = None
        if self.launcher.is_server:
            server = FederatedServer(self.strategy, self._data.num_clients, self.cost_model, self.max_sim_hours)
            server.initialize(initial)
        # The history holds one row per finished round: a resumed run goes on after its last.
        next_round = int(self.history[-1]["round"]) + 1 if self.history else 0
        first_round = self.launcher.start(server, self._reference, next_round)
        if not self.launcher.is_server and first_round != trainer.current_epoch:
            _continue_at(trainer, first_round)
        self._answer_queries(trainer, pl_module)

    def _answer_queries(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # On the server's process only: what the strategy asks about the model, its algorithm answers.
        owner = self._owner
        answer = None if owner is None else lambda query: owner.answer_query(query, trainer, pl_module)
        self.launcher.answer_queries(answer)

    # -- a round --------------------------------------------------------------------------------------
    def _round_dataloader(self) -> DataLoader:
        """Called by Lightning at the start of every epoch: open the round and lay out its batches."""
        assert self._data is not None and self._trainer is not None
        ticket = self.launcher.begin_round(self._trainer.current_epoch)
        loader, sampler = self._data.round_loader(ticket, self.local_epochs, self.local_steps, self.seed)
        if not sampler.segments:
            raise RuntimeError(f"rank {self.launcher.rank} has no client with data in round {ticket.round}")
        self._round = LocalRound(ticket, sampler)
        return loader

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        assert self._round is not None
        ctx = self._round.start_client(batch_idx)
        if ctx is None:
            return
        load_state(pl_module, ctx.global_state, self.algorithms)
        # Dropout etc. depend only on (seed, round, client), wherever the client is trained.
        torch.manual_seed(client_seed(self.seed, ctx.round, ctx.client_id))
        for algorithm in self.algorithms:
            algorithm.on_client_start(ctx, pl_module)
        if deepspeed_stage(trainer.strategy) is None:
            trainer.strategy.setup_optimizers(trainer)  # fresh optimizer (and schedulers) for every client
        else:  # DeepSpeed builds its optimizer once, in its engine: reset that one
            reset_zero_optimizer(trainer.strategy)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        local = self._round
        assert local is not None
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        sim_s = 0.0
        if self.cost_model is not None:
            model = priced_model(pl_module)
            cache = getattr(pl_module, "activation_cache", None)
            client = local.client.client_id if local.client is not None else None
            sim_s = self.cost_model.batch_seconds(model, batch, cache, client_id=client)
        local.record_step(loss if isinstance(loss, torch.Tensor) else None, sim_s)
        if local.ends_client(batch_idx):
            self._finish_client(pl_module)
            if batch_idx == local.last_batch:
                self._close_round(trainer, pl_module)

    def _finish_client(self, pl_module: pl.LightningModule) -> None:
        local = self._round
        assert local is not None and local.client is not None
        results = [algorithm.on_client_end(local.client, pl_module) for algorithm in self.algorithms]
        for result in results:
            self.round_log.note_client_metrics(result.metrics)
            result.tensors = to_host(result.tensors)  # computed where the model is (a GPU); sent from the CPU
        update = local.finish_client(host_trainable_state(pl_module), results, simulated=self.cost_model is not None)
        self.launcher.submit(update)

    def _close_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        local = self._round
        assert local is not None
        round_idx = local.ticket.round
        self.launcher.close_round(round_idx)  # the server's process aggregates; the others go on at once
        self._answer_queries(trainer, pl_module)
        # A client process needs the new global state only at the end (every client of the next round
        # starts from that round's state): one state download per rank and round instead of two.
        last_epoch = trainer.max_epochs is not None and round_idx >= trainer.max_epochs - 1
        outcome = self.launcher.finish_round(round_idx, state_needed=self.launcher.is_server or last_epoch)
        if outcome.global_state:
            load_state(pl_module, outcome.global_state, self.algorithms)
        if outcome.record is not None:
            if not outcome.record.received:
                self._refusals[round_idx] = refusals(outcome.record)
                log.warning(
                    "round %d: the server accepted no update, the global model is unchanged (%s)",
                    round_idx,
                    self._refusals[round_idx],
                )
            compressed = self.launcher.codec.compression != "none"
            row = self.round_log.server_row(outcome.record, local.losses, compressed, self.cost_model is not None)
        else:
            row = self.round_log.client_row(round_idx, len(local.ticket.client_ids), local.losses)
        if outcome.final:  # the server's stop rule ended the run with this round, on every process alike
            trainer.should_stop = True
        row["train_time_s"] = time.perf_counter() - local.opened_at
        # The run's last round is evaluated too, so the logged curve ends at the model fit returns.
        last = outcome.final or last_epoch
        self._validate_now = (round_idx + 1) % self.eval_every == 0 or last
        if self._validate_now:
            trainer.check_val_every_n_epoch = 1  # Lightning reads it after this batch, still in this epoch
        self._row = row
        self.round_log.log_to(pl_module, row)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        local = self._round
        if local is not None and self._row is None:  # the epoch stopped early (e.g. max_steps): close it anyway
            if local.client is not None:
                self._finish_client(pl_module)
            self._close_round(trainer, pl_module)
            # Lightning's validation point of this epoch has passed: only a scheduled one may have run.
            self._validate_now = (local.ticket.round + 1) % self.eval_every == 0
        if self._row is None or local is None:
            return
        row, self._row, self._round = self._row, None, None
        row["round_time_s"] = time.perf_counter() - local.opened_at  # includes the evaluation, if any
        trainer.check_val_every_n_epoch = self.eval_every
        assert self.strategy is not None
        tables = self.strategy.tables() if self.launcher.is_server else {}
        validation = trainer.callback_metrics if self._validate_now else None
        self.round_log.add(trainer, row, validation, tables, write=self.launcher.is_server)
        if self.launcher.is_server:
            self._stop_if_stalled()

    def _stop_if_stalled(self) -> None:
        # Before this round's checkpoint (the checkpoints run after RoundSync): the last one is kept as it was.
        empty = empty_rounds(self.history)
        if not self.max_empty_rounds or empty < self.max_empty_rounds:
            return
        rounds = [int(row["round"]) for row in self.history[-empty:]]
        why = "; ".join(f"round {r}: {self._refusals[r]}" for r in rounds if r in self._refusals)
        raise NoUpdateAccepted(
            f"the server accepted no client update in {empty} rounds in a row (rounds {rounds[0]}-{rounds[-1]}), "
            f"so the global model stopped changing ({why}). Lower the learning rate or check the clients' data; "
            f"federation.max_empty_rounds={self.max_empty_rounds} stops the run here (0: never). The last "
            f"checkpoint is kept as it was"
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._round is not None:
            self.on_train_epoch_end(trainer, pl_module)

    # -- the end of fit, in success and failure ---------------------------------------------------------
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._data is not None:
            self._data.release()
            self.launcher.shutdown()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Leave the data module as it was found, and stop the transport on every rank: a rank that failed
        # tells the others (they end with FederationAborted); one that heard of it just disconnects.
        if self._data is not None:
            self._data.release()
        if isinstance(exception, FederationAborted):
            self.launcher.shutdown()
        else:
            where = f"round {trainer.current_epoch}" if self._round is not None else "outside a round"
            self.launcher.abort(f"rank {self.launcher.rank} failed in {where}: {type(exception).__name__}: {exception}")

    # -- checkpointing ---------------------------------------------------------------------------------
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # The optimizer belongs to the last client and every client starts a fresh one, so its state is
        # not worth keeping; and when an algorithm changes the trainable parameters' shapes (FedAdapter
        # grows adapters, FedARA cuts ranks), the optimizer built at resume would not accept it.
        checkpoint["optimizer_states"] = []

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"history": list(self.history), "refusals": dict(self._refusals)}
        if self.strategy is not None:
            state["strategy"] = self.strategy.state_dict()
        if self.launcher.codec.compression != "none" and self._reference is not None:
            state["reference"] = self._reference  # what the resumed run's int8 downloads must be relative to
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callback state after setup, so the strategy to restore into exists.
        self.round_log.rows[:] = list(state_dict.get("history", []))
        self._reference = state_dict.get("reference")
        self._refusals = dict(state_dict.get("refusals", {}))  # why earlier rounds were empty, for the stop message
        if self.strategy is not None and "strategy" in state_dict:
            self.strategy.load_state_dict(state_dict["strategy"])


def _on(batch: dict[str, torch.Tensor], pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.to(pl_module.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _continue_at(trainer: pl.Trainer, round_idx: int) -> None:
    # A client rank restarted without a checkpoint joins the server's resumed run: Lightning's epoch counter
    # (current_epoch, which names the round and counts towards max_epochs) goes to the server's round, as a
    # restore from the checkpoint would set it. Only the counter: this rank's model, data and optimizer are
    # all reset from the server's state at every client anyway.
    progress = trainer.fit_loop.epoch_progress
    for counter in (progress.total, progress.current):
        counter.ready = counter.started = counter.processed = counter.completed = round_idx
