"""The boundary, fuzzed with hypothesis: update payloads at the server, config values at the CLI, data files.

Every bad update is rejected with a reason that names it, logged with its client, and the round completes
with the others, their average untouched. Every bad setting ends the CLI with one line naming the setting
(exit code 2, no traceback), before any training; every good one builds. Every malformed data file is
refused with a ``ValueError`` naming the file (and the line and column, for a row's fault); every good one
is read whole.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_fedpeft.protocol import ClientUpdate
from lightning_fedpeft.server import FederatedServer
from lightning_fedpeft.strategy import FedAvg

# What is wrong with client B's update, and a word its rejection must give.
BAD = {
    "nan": "non-finite",
    "inf": "non-finite",
    "huge": "moves the state by",
    "float16": "dtype",
    "int": "dtype",
    "missing": "missing ['b']",
    "extra": "unexpected ['c']",
    "empty": "shape (0,)",
    "late_round": "is not open",
    "early_round": "is not open",
    "stranger": "not a participant",
    "duplicate": "duplicate update",
    "oversized": "oversized",
    "not_a_tensor": "not a tensor",
    "no_examples": "not a positive count",
    "nan_examples": "not a positive count",
    "bool_examples": "not a positive count",
    "nan_tensor_beside": "non-finite",
}


def _server() -> tuple[FederatedServer, list[int]]:
    gen = torch.Generator().manual_seed(0)
    server = FederatedServer(FedAvg(3, seed=1), num_clients=6)
    server.initialize({"a": torch.randn(4, 3, generator=gen), "b": torch.randn(5, generator=gen)})
    return server, server.open_round(0).client_ids


def _good(server: FederatedServer, client: int, shift: float, examples: int = 10) -> ClientUpdate:
    return ClientUpdate(client, 0, examples, {k: v + shift for k, v in server.global_state.items()})


def _bad(kind: str, server: FederatedServer, client: int, stranger: int, value: float) -> ClientUpdate:
    update = _good(server, client, 0.5)
    state = dict(update.state)
    if kind in ("nan", "inf"):
        state["a"] = state["a"].clone()
        state["a"][0, 0] = math.nan if kind == "nan" else math.copysign(math.inf, value)
    elif kind == "huge":
        state["a"] = state["a"] * (1e6 + abs(value))
    elif kind == "float16":
        state["a"] = state["a"].half()
    elif kind == "int":
        state["b"] = state["b"].long()
    elif kind == "missing":
        state.pop("b")
    elif kind == "extra":
        state["c"] = torch.zeros(2)
    elif kind == "empty":
        state["b"] = torch.zeros(0)
    elif kind == "not_a_tensor":
        state["b"] = [value] * 5
    update.state = state
    if kind == "late_round":
        update.round = -1 - int(abs(value)) % 5
    elif kind == "early_round":
        update.round = 1 + int(abs(value)) % 5
    elif kind == "stranger":
        update.client_id = stranger
    elif kind == "oversized":
        update.tensors = {"x": torch.zeros(2**19)}  # 2 MiB beside a 128-byte state
    elif kind == "nan_tensor_beside":
        update.tensors = {"x": torch.tensor([math.nan])}
    elif kind == "no_examples":
        update.num_examples = -int(abs(value)) % 3 * -1 if value > 0 else 0
    elif kind == "nan_examples":
        update.num_examples = math.nan
    elif kind == "bool_examples":
        update.num_examples = True
    return update


@settings(max_examples=150, deadline=None)
@given(kind=st.sampled_from(sorted(BAD)), value=st.floats(allow_nan=False, allow_infinity=False, width=32))
def test_every_bad_update_is_rejected_naming_it_and_the_round_completes(kind: str, value: float) -> None:
    server, (a, b, c) = _server()
    stranger = next(i for i in range(6) if i not in (a, b, c))
    start = {k: v.clone() for k, v in server.global_state.items()}
    assert server.submit(_good(server, a, 1.0))
    if kind == "duplicate":
        assert server.submit(_good(server, b, 0.5))  # the first one counts, the second is refused
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("lightning_fedpeft.server").addHandler(handler)
    try:
        accepted = server.submit(_bad(kind, server, b, stranger, value))
    finally:
        logging.getLogger("lightning_fedpeft.server").removeHandler(handler)
    assert not accepted
    (message,) = messages
    assert BAD[kind] in message, (kind, message)
    culprit = stranger if kind == "stranger" else b
    assert f"from client {culprit}:" in message
    if kind not in ("late_round", "early_round", "stranger", "duplicate"):
        assert BAD[kind] in server.record.rejected[b]
    assert server.submit(_good(server, c, 3.0))
    server.close_round()
    outcome = server.finish_round()
    shifts = [1.0, 0.5, 3.0] if kind == "duplicate" else [1.0, 3.0]  # equal weights (10 examples each)
    mean = sum(shifts) / len(shifts)
    for name, tensor in outcome.global_state.items():
        torch.testing.assert_close(tensor, start[name] + mean)


# -- config values through the CLI parser ------------------------------------------------------------------------
def _valid(name: str, value: Any) -> bool:
    """Whether ``value`` is a good ``name`` for the tiny config below (the package's own rules)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    rules = {
        "federation.clients_per_round": lambda v: isinstance(v, int) and v >= 1,
        "federation.eval_every": lambda v: isinstance(v, int) and v >= 1,
        "federation.local_steps": lambda v: v is None or (isinstance(v, int) and v >= 1),
        "federation.max_sim_hours": lambda v: v is None,  # the tiny config has no cost model
        "federation.compression": lambda v: v in ("none", "int8"),
        "federation.mode": lambda v: v == "simulation",  # one process
        "federation.heartbeat_s": lambda v: number and 0 < v < 60,  # below liveness_timeout_s (60 s)
        "data.alpha": lambda v: number and math.isfinite(v) and v > 0,
        "data.max_length": lambda v: isinstance(v, int) and v >= 8,
        "model.lr": lambda v: number and math.isfinite(v) and v > 0,
        "model.method": lambda v: v in ("adapter", "lora", "svd", "full", "freeze"),
    }
    return rules[name](value)


DATA_DEPENDENT = {"data.alpha"}  # whether a partition is possible depends on the data too
VALUES = {
    "federation.clients_per_round": st.one_of(st.integers(-3, 6), st.just("three")),
    "federation.eval_every": st.integers(-2, 4),
    "federation.local_steps": st.one_of(st.none(), st.integers(-2, 4)),
    "federation.max_sim_hours": st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    "federation.compression": st.sampled_from(["none", "int8", "zip", ""]),
    "federation.mode": st.sampled_from(["simulation", "real", "simulated"]),
    "federation.heartbeat_s": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 90)),
    "data.alpha": st.floats(allow_nan=True, allow_infinity=True),
    "data.max_length": st.integers(-4, 64),
    "model.lr": st.floats(allow_nan=True, allow_infinity=True),
    "model.method": st.sampled_from(["adapter", "lora", "prefix", "LoRA"]),
}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory, cache_dir: str) -> Path:
    config = {
        "trainer": {"max_epochs": 1, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False},
        "model": {"num_hidden_layers": 1, "depth": 1, "width": 4},
        "data": {"corpus": "stackoverflow", "num_clients": 6, "max_train_examples": 300, "max_val_examples": 12},
        "federation": {"clients_per_round": 2},
    }
    config["data"] |= {"max_test_examples": 12, "max_length": 16, "cache_dir": cache_dir}
    path = tmp_path_factory.mktemp("fuzz") / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=st.fixed_dictionaries({}, optional=VALUES))
def test_bad_settings_end_the_cli_with_one_line_naming_them(drawn: dict[str, Any], tiny_config: Path, capsys) -> None:
    from lightning_fedpeft.cli import run_cli

    args = ["--config", str(tiny_config)] + [f"--{k}={_text(v)}" for k, v in drawn.items()]
    bad = [k for k, v in drawn.items() if not _valid(k, v)]
    capsys.readouterr()
    try:
        run_cli(args, run=False)
    except SystemExit as stop:
        err = capsys.readouterr().err
        assert stop.code == 2 and "Traceback" not in err, err[-1500:]
        # A good alpha can still fail to split this data (a clear error that names it); nothing else may.
        named = bad or [k for k in drawn if k in DATA_DEPENDENT]
        assert named, f"a good config was refused: {drawn}\n{err[-1500:]}"
        assert any(k.split(".")[-1] in err for k in named), (named, err[-1500:])
        return
    assert not bad, f"bad settings were taken: {[(k, drawn[k]) for k in bad]}"


def _text(value: Any) -> str:
    return "null" if value is None else str(value)


# -- data files: every row checked before training ------------------------------------------------------------
TOPIC_ROWS = [("the team won the match", "sports"), ("bake the bread", "food"), ("a fast laptop", "tech")] * 4
# What is wrong with one row, and the words its refusal must give (None: the file is good).
FILE_FAULTS: dict[str, tuple[str, ...] | None] = {
    "good": None,
    "blank_line": None,  # a line of white space carries nothing: skipped
    "byte_order_mark": None,  # UTF-8 with a BOM is UTF-8
    "quoted_comma": None,  # a separator inside a quoted value is a value
    "latin1": ("is not UTF-8", "iconv"),
    "short_row": ("has 1 of the header's 2 fields", "no value for column 'topic'"),
    "extra_field": ("has 3 fields, the header 2", "Quote that value"),
    "empty_label": ("data.label_column='topic' is empty in 1 rows",),
    "blank_text": ("data.text_column='sentence' is empty in 1 rows",),
    "json_missing_key": ("data.label_column='topic' is empty in 1 rows",),
    "json_null": ("data.label_column='topic' is empty in 1 rows",),
    "json_not_object": ("is not a JSON object",),
    "json_broken": ("is not a JSON object",),
}


def _write_file(folder: Path, fault: str, where: int) -> tuple[Path, int]:
    """A data file of TOPIC_ROWS whose data row ``where`` carries ``fault``; its path and that row's line."""
    rows = [list(r) for r in TOPIC_ROWS]
    line = where + 2  # a header line first, lines count from 1
    if fault.startswith("json"):
        records: list[str] = [json.dumps({"sentence": t, "topic": c}) for t, c in rows]
        records[where] = {
            "json_missing_key": json.dumps({"sentence": rows[where][0]}),
            "json_null": json.dumps({"sentence": rows[where][0], "topic": None}),
            "json_not_object": json.dumps([rows[where][0], rows[where][1]]),
            "json_broken": '{"sentence": "unclosed',
        }[fault]
        path = folder / "data.jsonl"
        path.write_text("\n".join(records) + "\n")
        return path, where + 1
    lines = [f'"{t}",{c}' for t, c in rows]
    if fault == "short_row":
        lines[where] = f'"{rows[where][0]}"'
    elif fault == "extra_field":
        lines[where] = f"{rows[where][0]},{rows[where][1]},again"
    elif fault == "empty_label":
        lines[where] = f'"{rows[where][0]}",'
    elif fault == "blank_text":
        lines[where] = f'"   ",{rows[where][1]}'
    elif fault == "quoted_comma":
        lines[where] = f'"{rows[where][0]}, twice",{rows[where][1]}'
    elif fault == "blank_line":
        lines.insert(where, "   ")
    text = "sentence,topic\n" + "\n".join(lines) + "\n"
    path = folder / "data.csv"
    if fault == "latin1":
        path.write_bytes(text.replace(rows[where][0], rows[where][0] + " caf\u00e9").encode("latin-1"))
    else:
        path.write_bytes(("\ufeff" if fault == "byte_order_mark" else "").encode() + text.encode())
    return path, line


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fault=st.sampled_from(sorted(FILE_FAULTS)), where=st.integers(0, len(TOPIC_ROWS) - 1))
def test_a_malformed_data_file_is_refused_naming_the_file_and_the_line(
    fault: str, where: int, tmp_path_factory: pytest.TempPathFactory, cache_dir: str
) -> None:
    from lightning_fedpeft import FederatedTextDataModule

    path, line = _write_file(tmp_path_factory.mktemp("files"), fault, where)
    columns = {"text_column": "sentence", "label_column": "topic", "num_clients": 2, "partitioner": "iid"}
    build = lambda: FederatedTextDataModule(  # noqa: E731
        corpus=None, train_file=str(path), val_fraction=0.25, cache_dir=cache_dir, **columns
    )
    expected = FILE_FAULTS[fault]
    if expected is None:
        data = build()
        assert sum(len(c) for c in data.client_indices) + len(data._raw["dev"][0]) == len(TOPIC_ROWS)
        assert data.label_names == ["food", "sports", "tech"]
        return
    with pytest.raises(ValueError) as refused:
        build()
    message = str(refused.value)
    assert str(path) in message and all(words in message for words in expected), message
    if fault not in ("latin1",):  # a row's fault names its line
        assert f"line {line}" in message, message


# -- settings that depend on the loaded model: built and run one step -----------------------------------------
MODEL_DEPENDENT = {
    "model.method": st.sampled_from(["adapter", "lora", "svd", "freeze", "full"]),
    "model.depth": st.integers(-1, 2),  # the model below has 1 layer
    "model.width": st.integers(0, 4),
    "model.rank": st.integers(0, 4),
    "model.target_modules": st.sampled_from(["null", "[query]", "[nothing]"]),
}
MAX_LENGTH = {"data.max_length": st.sampled_from([8, 64, 512, 513, 700])}  # MiniLM reads at most 512 positions


@pytest.fixture(scope="module")
def one_step_config(tmp_path_factory: pytest.TempPathFactory, cache_dir: str) -> Path:
    config = {
        "trainer": {
            "max_epochs": 1,
            "max_steps": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "limit_val_batches": 0,
        },
        "model": {"num_hidden_layers": 1, "depth": 1, "width": 4},
        "data": {"corpus": "20NG", "num_clients": 2, "partitioner": "iid", "max_train_examples": 16},
        "federation": {"clients_per_round": 1, "local_steps": 1},
        "test_after_fit": False,
    }
    config["data"] |= {"max_val_examples": 4, "max_test_examples": 4, "batch_size": 4, "cache_dir": cache_dir}
    folder = tmp_path_factory.mktemp("fuzz")
    # Without a logger, LightningCLI saves the parsed config in the trainer's root dir: keep it out of the repo.
    config["trainer"]["default_root_dir"] = str(folder)
    path = folder / "one_step.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=st.fixed_dictionaries(MAX_LENGTH, optional=MODEL_DEPENDENT))
def test_model_dependent_settings_are_refused_before_the_first_step_or_train(
    drawn: dict[str, Any], one_step_config: Path, capsys
) -> None:
    """Parsing is not enough: a setting the loaded model cannot honour must be refused in one line before
    training starts, not crash in the first step (data.max_length above the position table did)."""
    from lightning_fedpeft.cli import run_cli

    args = ["fit", "--config", str(one_step_config)] + [f"--{k}={v}" for k, v in drawn.items()]
    capsys.readouterr()
    try:
        cli = run_cli(args)
    except SystemExit as stop:
        err = capsys.readouterr().err
        assert stop.code == 2 and "Traceback" not in err, err[-1500:]
        assert any(k.split(".")[-1] in err for k in drawn), (drawn, err[-1500:])
        return
    assert cli.trainer.global_step == 1, drawn  # it trained
