"""Every bad setting fails before training with a message naming the setting."""

from pathlib import Path

import pytest

from lightning_fedpeft import FederatedTextDataModule, FedPEFTModule, RoundSync


def _dm(tmp: str, **kwargs):
    args = {"corpus": "20NG", "num_clients": 4, "max_train_examples": 200, "cache_dir": tmp} | kwargs
    return FederatedTextDataModule(**args)


def test_unknown_corpus_lists_the_allowed_names(cache_dir: str) -> None:
    with pytest.raises(ValueError, match=r"data\.corpus='20news'.*20NG.*clinc"):
        _dm(cache_dir, corpus="20news")


def test_missing_columns_name_the_setting_and_the_columns(topic_csv: Path, cache_dir: str) -> None:
    with pytest.raises(ValueError, match=r"data\.text_column='text'.*\['sentence', 'topic'\]"):
        _dm(cache_dir, corpus=None, train_file=str(topic_csv))
    with pytest.raises(ValueError, match=r"data\.label_column='label'"):
        _dm(cache_dir, corpus=None, train_file=str(topic_csv), text_column="sentence")


def test_fewer_examples_than_clients(cache_dir: str) -> None:
    with pytest.raises(ValueError, match=r"data\.num_clients=500 exceeds the 200"):
        _dm(cache_dir, num_clients=500)


def test_alpha_must_be_positive(cache_dir: str) -> None:
    with pytest.raises(ValueError, match=r"data\.alpha=0"):
        _dm(cache_dir, alpha=0)


def test_clients_per_round_above_num_clients(cache_dir: str) -> None:
    import lightning.pytorch as pl

    dm = _dm(cache_dir)
    module = FedPEFTModule(num_labels=dm.num_labels, num_hidden_layers=2, depth=1, width=4)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[RoundSync(clients_per_round=5)], logger=False, enable_checkpointing=False
    )
    with pytest.raises(ValueError, match=r"clients_per_round=5 exceeds the 4 clients"):
        trainer.fit(module, datamodule=dm)
    assert all(p.equal(before[n]) for n, p in module.named_parameters()), "nothing trained"


def test_model_path_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"model_name_or_path=.*has no weights"):
        FedPEFTModule(model_name_or_path=str(tmp_path))
    with pytest.raises(ValueError, match=r"is not a folder"):
        FedPEFTModule(model_name_or_path=str(tmp_path / "nope"))


def test_unknown_peft_method() -> None:
    with pytest.raises(ValueError, match=r"model\.method='prefix'.*adapter, lora, svd, full"):
        FedPEFTModule(method="prefix")


def test_depth_larger_than_the_model() -> None:
    with pytest.raises(ValueError, match=r"depth=3 is outside the model's layers: allowed 0\.\.2"):
        FedPEFTModule(num_hidden_layers=2, method="adapter", depth=3)


def test_max_sim_hours_needs_a_cost_model_and_a_positive_budget() -> None:
    from lightning_fedpeft.cost import CostModel

    with pytest.raises(ValueError, match=r"max_sim_hours needs a simulated clock: set federation\.cost_model"):
        RoundSync(clients_per_round=2, max_sim_hours=0.01)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"federation\.max_sim_hours=.* must be a positive number of hours"):
            RoundSync(clients_per_round=2, cost_model=CostModel("tx2"), max_sim_hours=bad)


def test_a_trainer_setting_lightning_refuses_is_one_line_too(capsys: pytest.CaptureFixture) -> None:
    from lightning_fedpeft.cli import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(["--trainer.max_epochs=-5", "--data.corpus=stackoverflow"], run=False)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_epochs" in err[0] and "-5" in err[0], err


def test_the_transport_settings_are_checked_and_defaulted_in_one_place() -> None:
    import inspect

    from lightning_fedpeft.launchers import TransportConfig

    with pytest.raises(ValueError, match=r"federation\.heartbeat_s=90 must be below federation\.liveness_timeout_s=60"):
        RoundSync(heartbeat_s=90)
    with pytest.raises(ValueError, match=r"federation\.wait_timeout_s=0 must be a positive number"):
        RoundSync(wait_timeout_s=0)
    assert RoundSync(heartbeat_s=1, liveness_timeout_s=3) is not None  # a faster beat for a shorter timeout
    defaults = TransportConfig()
    parameters = inspect.signature(RoundSync).parameters
    for name in ("mode", "compression", "round_deadline_s", "liveness_timeout_s", "wait_timeout_s", "heartbeat_s"):
        assert parameters[name].default == getattr(defaults, name), name


def test_the_peft_settings_are_checked_together_before_any_load() -> None:
    from lightning_fedpeft.models import PEFTConfig

    for settings, message in (
        ({"method": "lora", "lora_alpha": 0}, r"model\.lora_alpha=0 must be positive"),
        ({"method": "svd", "lora_dropout": 1.5}, r"model\.lora_dropout=1\.5 must be within \[0, 1\)"),
        ({"method": "lora", "rank": 0}, r"model\.rank=0 must be a positive integer"),
        ({"method": "svd", "orth_reg_weight": -1.0}, r"model\.orth_reg_weight=-1\.0 must be >= 0"),
    ):
        with pytest.raises(ValueError, match=message):
            PEFTConfig(**settings)
        with pytest.raises(ValueError, match=message):  # the module refuses it before reading a weight
            FedPEFTModule(model_name_or_path="/no/such/folder", **settings)
    assert PEFTConfig("adapter", rank=0).rank == 0  # a setting the method does not read is left alone
