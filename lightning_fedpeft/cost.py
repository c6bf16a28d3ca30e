"""Simulated time on edge devices: compute from counted FLOPs, communication from real bytes.

A federated round on real devices takes the slowest participant's local compute plus its download and
upload. This module turns what a simulated client actually did into those seconds:

* **Compute**: the FLOPs of one training step of the configuration being trained (forward through the
  layers that run, backward through the trainable top), counted with ``torch.utils.flop_counter.
  FlopCounterMode``, then ``overhead_s + flops / flops_per_s`` of the client's device profile. With the
  activation cache, a step runs only the layers above the frozen boundary, and a cache miss adds the
  frozen bottom's forward for that example. A transformer's FLOPs per example are a quadratic in the
  sequence length (linear layers grow with it, attention with its square, pooler and head not at all),
  so each configuration is counted on three one-example probes of fixed lengths and the quadratic
  through them gives any batch's count exactly (a fourth, two-example probe splits off what a step costs
  once whatever its batch, such as AdaLoRA's orthogonality penalty). The count so depends only on the
  configuration and the batch's shape, never on which batch came first: every rank of a multi-rank run
  gets the same clock.
* **Communication**: bytes each way divided by the bandwidth (``bandwidth_mbps`` in MB/s, 1 MB = 1e6 B).

Device profiles are in ``resources/devices.yaml`` (or a file of your own, same format). The TX2 profile
is fitted to the published TX2 table (:mod:`lightning_fedpeft.calibration`, ``docs/results.md``).

Written here rather than taken from a library: DeepSpeed's profiler and FlopCounterMode count FLOPs, but
neither turns counts into device time or simulates rounds.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_fedpeft.cache import encoder_parts, frozen_boundary, only_layers
from lightning_fedpeft.fleet import Fleet
from lightning_fedpeft.tuners.adapter import find_transformer_layers

MB = 1e6


@dataclass(frozen=True)
class DeviceProfile:
    """How fast a device trains (``overhead_s + flops / flops_per_s`` seconds per batch), and how much memory
    a training process may use there (``memory_gb``, 1 GB = 1e9 B; ``None``: not limited)."""

    name: str
    flops_per_s: float
    overhead_s: float = 0.0
    memory_gb: float | None = None

    def fits(self, nbytes: float) -> bool:
        """Whether a training process of ``nbytes`` fits this device's memory."""
        return self.memory_gb is None or nbytes <= self.memory_gb * 1e9

    def batch_seconds(self, flops: float) -> float:
        return self.overhead_s + flops / self.flops_per_s


def load_device_profiles(path: str | Path | None = None) -> dict[str, DeviceProfile]:
    """Read device profiles from a YAML file (default: the packaged ``devices.yaml``).

    Raises ``ValueError`` naming the profile and field when an entry is malformed.
    """
    if path is None:
        text = resources.files("lightning_fedpeft").joinpath("resources/devices.yaml").read_text()
        where = "devices.yaml"
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ValueError(f"cost_model.devices_file={str(path)!r} does not exist; give a YAML file of profiles")
        text, where = p.read_text(), str(p)
    raw = yaml.safe_load(text) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping of profile name -> settings")
    out: dict[str, DeviceProfile] = {}

    def resolve(name: str, seen: tuple[str, ...] = ()) -> DeviceProfile:
        if name in out:
            return out[name]
        if name not in raw:
            raise ValueError(f"{where}: profile {name!r} is not defined (known: {', '.join(sorted(raw))})")
        if name in seen:
            raise ValueError(f"{where}: profiles {' -> '.join(seen + (name,))} refer to each other in a loop")
        entry = raw[name]
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: profile {name!r} must be a mapping")
        if "like" in entry:
            base = resolve(str(entry["like"]), seen + (name,))
            slowdown = float(entry.get("slowdown", 1.0))
            if not slowdown > 0:
                raise ValueError(f"{where}: profile {name!r} slowdown={slowdown} must be positive")
            memory = _memory_gb(entry, name, where, base.memory_gb)
            profile = DeviceProfile(name, base.flops_per_s / slowdown, base.overhead_s * slowdown, memory)
        else:
            try:
                flops = float(entry["flops_per_s"])
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{where}: profile {name!r} needs flops_per_s (a positive number) or like:") from err
            if not flops > 0:
                raise ValueError(f"{where}: profile {name!r} flops_per_s={flops} must be positive")
            profile = DeviceProfile(name, flops, float(entry.get("overhead_s", 0.0)), _memory_gb(entry, name, where))
        out[name] = profile
        return profile

    for name in raw:
        resolve(str(name))
    return out


def _memory_gb(entry: Mapping[str, Any], name: str, where: str, inherited: float | None = None) -> float | None:
    if "memory_gb" not in entry:
        return inherited
    try:
        memory = float(entry["memory_gb"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: profile {name!r} memory_gb={entry['memory_gb']!r} must be a number of GB") from err
    if not (math.isfinite(memory) and memory > 0):
        raise ValueError(f"{where}: profile {name!r} memory_gb={memory} must be a positive number of GB")
    return memory


class _InputRequiresGrad:
    """Forward pre-hook: the layer's hidden-state input is cut from below and requires grad."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def __call__(self, _module: nn.Module, args: tuple) -> tuple:
        # A non-leaf (x * 1): autograd.grad with a leaf input trips FlopCounterMode's module tracker.
        hidden = args[0].detach().requires_grad_(True) * 1.0
        self.inputs.append(hidden)
        return (hidden, *args[1:])


def count_train_flops(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    cached: bool = False,
    through_lowest_layer: bool = True,
    boundary_cap: int | None = None,
) -> tuple[int, int]:
    """FLOPs of one training step of ``model`` on ``batch`` as its parameters' ``requires_grad`` stand.

    Returns ``(step_flops, bottom_flops_per_example)``. With ``cached``, the step runs only the layers
    above the frozen boundary (the activation cache's path) and ``bottom_flops_per_example`` is the cost
    of computing one example's cache entry; otherwise it is 0. Gradients are taken with
    ``torch.autograd.grad`` and dropped, so the model's ``.grad`` and the RNG are left untouched.

    ``through_lowest_layer`` (the cost model's rule, see below) counts backward down to the input of the
    lowest trainable layer; ``False`` counts only what autograd itself runs, which is what a wall clock
    on this machine sees (the activation-cache bench reports that FLOP ratio beside its timings).

    ``boundary_cap`` (with ``cached``): the cache serves no boundary above it (:attr:`ActivationCache.stable_boundary`:
    a fleet client that freezes live layers others train); the layers between run forward without gradients.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    layers = find_transformer_layers(model)  # an encoder's or a decoder's; only the cached path needs an encoder
    lowest = frozen_boundary(model)
    boundary = (lowest if boundary_cap is None else min(lowest, boundary_cap)) if cached else 0
    ids = batch["input_ids"]
    # Backward is counted through the whole trainable top, down to its input: the input of the lowest
    # trainable layer is made to require grad. (Autograd would otherwise skip the input gradients of the
    # lowest layer's attention and feed-forward when only its adapter trains; the published table counts
    # that layer fully, and this rule makes the count independent of where in the layer the adapter sits.)
    leaf = _InputRequiresGrad()
    hooked = through_lowest_layer and 0 < lowest < len(layers)
    handle = layers[lowest].register_forward_pre_hook(leaf) if hooked else None
    counter = FlopCounterMode(display=False)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[]))
        stack.enter_context(counter)
        if handle is not None:
            stack.callback(handle.remove)
        if boundary > 0:
            hidden_size = model.config.hidden_size
            dtype = next(model.parameters()).dtype
            given = torch.zeros(*ids.shape, hidden_size, device=ids.device, dtype=dtype)
            with only_layers(model, boundary, len(layers), given=given):
                loss = model(**batch).loss
        else:
            loss = model(**batch).loss
        if params and loss.requires_grad:
            torch.autograd.grad(loss, params + leaf.inputs, allow_unused=True)
    step = counter.get_total_flops()
    bottom = 0
    if boundary > 0:
        counter = FlopCounterMode(display=False)
        # In the RNG's own fork too: the bottom runs in train mode, and its dropout must not move the
        # training's random stream (a probe made only by a resumed run would change what it trains).
        base = encoder_parts(model)[0]
        with torch.random.fork_rng(devices=[]), torch.no_grad(), counter, only_layers(model, 0, boundary):
            base(input_ids=ids, attention_mask=batch.get("attention_mask"))
        bottom = counter.get_total_flops() // max(1, ids.shape[0])
    return step, bottom


class CostModel:
    """Simulated seconds of a client's round on an edge device, and whether its training fits there.

    Args:
        device: a profile name from ``devices_file`` (packaged: ``tx2``, ``nano``, ``rpi4b``, ``orin_nano``);
            every client's device unless ``fleet`` says otherwise.
        bandwidth_mbps: network bandwidth each way, in MB/s.
        devices_file: a YAML file of device profiles (see ``resources/devices.yaml`` for the format).
        fleet: a mixed fleet (:class:`~lightning_fedpeft.fleet.Fleet`): each client's device, dealt once
            the run knows its clients and seed (:meth:`bind`).
    """

    def __init__(
        self,
        device: str = "tx2",
        bandwidth_mbps: float = 1.0,
        devices_file: str | None = None,
        fleet: Fleet | None = None,
    ) -> None:
        profiles = load_device_profiles(devices_file)
        if device not in profiles:
            raise ValueError(f"cost_model.device={device!r} is unknown; known profiles: {', '.join(sorted(profiles))}")
        if not (bandwidth_mbps > 0 and math.isfinite(bandwidth_mbps)):
            raise ValueError(f"cost_model.bandwidth_mbps={bandwidth_mbps} must be a positive number of MB/s")
        self.profiles = profiles
        self.device = profiles[device]
        self.bandwidth_mbps = float(bandwidth_mbps)
        self.fleet = fleet
        self.client_devices: list[str] = []  # per client, once bound (a fleet); empty: every client on `device`

    def bind(self, num_clients: int, seed: int) -> None:
        """Deal the fleet (if any) over ``num_clients`` clients from ``seed``; ``ValueError`` naming the setting."""
        if self.fleet is not None:
            self.client_devices = self.fleet.deal(num_clients, seed, list(self.profiles))

    def device_of(self, client_id: int | None) -> DeviceProfile:
        """The profile client ``client_id`` trains on (``device`` without a fleet or a client)."""
        if client_id is None or not self.client_devices:
            return self.device
        return self.profiles[self.client_devices[client_id]]

    def fleet_profiles(self) -> list[DeviceProfile]:
        """Every profile some client runs on (the one ``device`` without a fleet)."""
        if not self.client_devices:
            return [self.device]
        return [self.profiles[name] for name in dict.fromkeys(self.client_devices)]

    def comm_seconds(self, nbytes: float) -> float:
        return nbytes / (self.bandwidth_mbps * MB)

    def step_flops(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor], cached: bool, boundary_cap: int | None = None
    ) -> tuple[float, float]:
        """``(step_flops, bottom_flops_per_example)`` for this batch's shape (probed once per configuration);
        ``boundary_cap`` as :func:`count_train_flops`."""
        ids = batch["input_ids"]
        cap = boundary_cap if cached else None
        # A second example at the first length separates what a step costs once (AdaLoRA's
        # orthogonality penalty, on the weights alone) from what it costs per example. Its layout is the key's:
        # this runs every batch, so the length probes are built only when a count is missing.
        twice_probe = _probe_batch(batch, PROBE_LENGTHS[0], size=2)

        def count() -> tuple[float, tuple[float, ...], tuple[float, ...]]:
            counts = [
                count_train_flops(model, _probe_batch(batch, n), cached=cached, boundary_cap=cap) for n in PROBE_LENGTHS
            ]
            twice, _ = count_train_flops(model, twice_probe, cached=cached, boundary_cap=cap)
            once = 2.0 * counts[0][0] - twice
            per_example = tuple(step - once for step, _ in counts)
            return once, per_example, tuple(float(b) for _, b in counts)

        once, per_example, bottoms = _memo(
            ("flops", _signature(model), cached, cap, _digest(twice_probe, values=False)), count
        )
        batch_size, length = ids.shape
        return once + batch_size * _through(per_example, length), _through(bottoms, length)

    def memory_bytes(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> int:
        """:func:`train_memory_bytes` of ``model`` on ``batch``, counted once per configuration and batch."""
        return _memo(
            ("memory", _signature(model), _digest(batch, values=True)), lambda: train_memory_bytes(model, batch)
        )

    def batch_seconds(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor], cache: Any = None, client_id: int | None = None
    ) -> float:
        """Device seconds of one training step on ``batch`` (plus cache fills, if the cache missed), on
        client ``client_id``'s device."""
        last = getattr(cache, "last", None) or {}
        cached = last.get("boundary", 0) > 0
        # The boundary the cache used: below a fleet client's own frozen layers when it capped it.
        step, bottom = self.step_flops(model, batch, cached, last.get("boundary") if cached else None)
        device = self.device_of(client_id)
        seconds = device.batch_seconds(step)
        if cached and last.get("misses", 0):
            seconds += bottom * last["misses"] / device.flops_per_s
        return seconds

    def round_seconds(
        self,
        model: nn.Module,
        batch: Mapping[str, torch.Tensor],
        local_batches: float,
        nbytes: float,
        device: DeviceProfile,
        cached: bool = False,
        boundary_cap: int | None = None,
        nbytes_up: float | None = None,
    ) -> float:
        """Predicted seconds of a client round on ``device``: ``local_batches`` steps of ``model`` as it
        stands on batches shaped like ``batch``, plus ``nbytes`` down and ``nbytes_up`` (default ``nbytes``)
        up (``boundary_cap`` as :func:`count_train_flops`)."""
        step, _ = self.step_flops(model, batch, cached, boundary_cap)
        up = nbytes if nbytes_up is None else nbytes_up
        return device.batch_seconds(step) * local_batches + self.comm_seconds(nbytes) + self.comm_seconds(up)

    def train_depth_costs(
        self,
        model: nn.Module,
        batch: Mapping[str, torch.Tensor],
        local_batches: float,
        nbytes: float,
        depths: Iterable[int],
        train_depth: Callable[[int], contextlib.AbstractContextManager[list[nn.Parameter]]],
        cached: bool = False,
        boundary_cap: int | None = None,
    ) -> list[dict[str, Any]]:
        """On a fleet, per depth of ``depths``: ``{"depth", "seconds": {profile: round seconds}, "memory_bytes"}``
        of a client that trains only its top ``depth`` layers. ``train_depth(depth)`` is the context in which
        the model trains so, yielding the parameters it froze.

        What travels: the whole state (``nbytes``) down, since the frozen modules run forward and others trained
        them last round; the state less the frozen modules up (``TrialGroupStrategy.download_share``).
        """
        out = []
        for depth in depths:
            with train_depth(depth) as frozen:
                up = nbytes - sum(p.numel() * p.element_size() for p in frozen)
                seconds = {
                    p.name: self.round_seconds(model, batch, local_batches, nbytes, p, cached, boundary_cap, up)
                    for p in self.fleet_profiles()
                }
                memory = self.memory_bytes(model, batch)
            out.append({"depth": depth, "seconds": seconds, "memory_bytes": memory})
        return out


def priced_model(pl_module: nn.Module) -> nn.Module:
    """The model the cost model prices: the one a training batch goes to as ``model(**batch)``, with a ``.loss``.

    ``FedPEFTModule``'s ``model``; in a LightningModule of your own, the outermost Hugging Face model (a
    ``transformers.PreTrainedModel`` or a ``peft.PeftModel``) it holds, whatever the attribute is called.
    Anything else is returned as it is, and :func:`check_priceable` says why it cannot be priced.
    """
    inner = getattr(pl_module, "model", None)
    if isinstance(inner, nn.Module):
        return inner
    from peft import PeftModel
    from transformers import PreTrainedModel

    # modules() walks from the top down, so the first match is the outermost (a PeftModel before its base).
    return next((m for m in pl_module.modules() if isinstance(m, (PreTrainedModel, PeftModel))), pl_module)


def check_priceable(pl_module: nn.Module, batch: Any) -> None:
    """Raise ``ValueError`` before training if the cost model cannot price a step of ``pl_module`` on ``batch``.

    A step is priced by counting a forward and backward of :func:`priced_model` on a dict batch holding
    ``input_ids`` (the probes vary its length): a tuple batch or a model that is not a Hugging Face one would
    otherwise fail at the first step with an error about neither.
    """
    from peft import PeftModel
    from transformers import PreTrainedModel

    fix = "or leave federation.cost_model (RoundSync(cost_model=...)) unset to train without a simulated clock"
    if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"), torch.Tensor):
        got = f"a dict with keys {sorted(batch)}" if isinstance(batch, Mapping) else f"a {type(batch).__name__}"
        raise ValueError(
            f"federation.cost_model prices a step from a Hugging Face batch, a dict with an input_ids tensor "
            f"(and labels), but the training batch is {got}: have the data module's collate_fn return such "
            f"dicts, {fix}"
        )
    model = priced_model(pl_module)
    if not isinstance(model, (PreTrainedModel, PeftModel)):
        raise ValueError(
            f"federation.cost_model prices a Hugging Face model (transformers or peft) called as "
            f"model(**batch).loss, and {type(pl_module).__name__} holds none: keep one as an attribute "
            f"(self.model = get_peft_model(...)), {fix}"
        )


def check_memory(
    cost_model: CostModel,
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    what: str,
    profiles: Sequence[DeviceProfile] | None = None,
) -> int:
    """Raise ``ValueError`` naming the profile if training ``model`` on ``batch`` (its counted memory,
    :func:`train_memory_bytes`) does not fit some device of the run (or of ``profiles``); return the bytes."""
    need = cost_model.memory_bytes(model, batch)
    for profile in cost_model.fleet_profiles() if profiles is None else profiles:
        if not profile.fits(need):
            raise ValueError(
                f"cost_model device profile {profile.name!r} (memory_gb={profile.memory_gb:g}) cannot hold {what}: "
                f"{need / 1e9:.3g} GB counted (weights, gradients and AdamW moments of the trainable part, saved "
                f"activations of one batch); raise its memory_gb, use a smaller model, batch or configuration, or "
                f"drop that device from cost_model.fleet"
            )
    return need


def train_memory_bytes(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> int:
    """Bytes a training step of ``model`` on ``batch`` holds at its peak, counted, not measured:

    every parameter and buffer, plus three more copies of each trainable parameter (its gradient and
    AdamW's two moments), plus the activations autograd saves for the backward pass (tensor storages
    recorded by ``saved_tensors_hooks`` during one forward, each once, parameters not counted twice).
    What it leaves out (the framework's own code and workspace, the allocator's slack) is what a device
    profile's ``memory_gb`` should leave room for: it is the memory a training process may *use*.
    """
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    total += 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    saved: dict[int, int] = {}

    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            saved[storage.data_ptr()] = storage.nbytes()
        # Held here until the forward ends (as the graph would hold it, so no address is reused and counted
        # as one), not in the graph: a node saving its own output (tanh, softmax) would then hold
        # node -> tensor -> grad_fn -> node, a cycle through autograd's C++ graph that Python's collector cannot
        # free, and every count leaked a forward's activations. Nothing unpacks: the graph never runs backward.
        kept.append(t)

    with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
        model(**batch)
    kept.clear()
    return total + sum(saved.values())


# Sequence lengths of the three one-example probes a configuration is counted on (any three distinct
# lengths give the same quadratic; short ones keep the counting cheap).
PROBE_LENGTHS = (8, 16, 32)


def _probe_batch(batch: Mapping[str, torch.Tensor], length: int, size: int = 1) -> dict[str, torch.Tensor]:
    """``size`` examples of ``length`` tokens, shaped like ``batch`` (a real token id repeated, no padding)."""
    ids = batch["input_ids"]
    probe: dict[str, torch.Tensor] = {}
    for name, value in batch.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != ids.shape[0]:
            probe[name] = value
        elif name == "attention_mask":
            probe[name] = torch.ones(size, length, dtype=value.dtype, device=value.device)
        elif value.dim() >= 2 and value.shape[1] == ids.shape[1]:  # per-token: ids, token types, token labels
            probe[name] = value[:1, :1].expand(size, length, *value.shape[2:]).clone()
        else:  # per-example: a class label
            probe[name] = value[:1].expand(size, *value.shape[1:]).clone()
    return probe


def _through(counts: Sequence[float], length: int) -> float:
    """The quadratic through ``(PROBE_LENGTHS[i], counts[i])``, at ``length``."""
    return float(np.polyval(np.polyfit(PROBE_LENGTHS, counts, 2), length))


def _signature(model: nn.Module) -> str:
    """What decides a step's FLOPs and memory: the model's class and config, every parameter's shape and
    dtype, and which train.

    Frozen ones count too: a frozen module's shape is in the forward (an SVD module of a fleet client's
    frozen layers, or one a mask cut down), so two models that train the same parameters can cost apart.
    """
    h = hashlib.sha1()
    config = getattr(model, "config", None)
    described = config.to_dict() if hasattr(config, "to_dict") else config
    if isinstance(described, dict):
        # Set by the first forward from the labels (which the batch's digest covers): not a configuration.
        described.pop("problem_type", None)
    h.update(f"{type(model).__qualname__}:{described!r};".encode())
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{int(p.requires_grad)};".encode())
    return h.hexdigest()


def _digest(batch: Mapping[str, Any], values: bool) -> str:
    """A batch's keys, shapes and dtypes, and with ``values`` its contents: what a count on it depends on.

    FLOPs do not depend on the values (so any batch of a shape shares one count); saved activations can
    (an all-ones attention mask may skip the mask's tensors), so the memory count takes them too.
    """
    h = hashlib.sha1()
    for name in sorted(batch):
        value = batch[name]
        if isinstance(value, torch.Tensor):
            h.update(f"{name}:{tuple(value.shape)}:{value.dtype};".encode())
            if values:
                # As bytes, whatever the dtype (numpy has no bfloat16).
                h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"{name}={value!r};".encode())
    return h.hexdigest()


# Counts are kept for the whole process, not per cost model: counting runs the model four times under
# Python-level dispatch (slow beside the step it prices), and a process meets the same configurations
# again: a fleet's candidate sizes every round once the mask settles, a resumed run, the runs of a bench
# or a test session. A count depends only on its key and runs in a forked RNG, so a hit changes nothing
# but the time. Bounded: the oldest entries go first.
_COUNTS: dict[tuple, Any] = {}
_COUNTS_MAX = 4096


def _memo(key: tuple, count: Callable[[], Any]) -> Any:
    """``count()``, once per ``key`` while it stays among the last ``_COUNTS_MAX`` keys."""
    if key not in _COUNTS:
        if len(_COUNTS) >= _COUNTS_MAX:
            del _COUNTS[next(iter(_COUNTS))]
        _COUNTS[key] = count()
    return _COUNTS[key]
