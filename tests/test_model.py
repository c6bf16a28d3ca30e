import pytest
import torch

from lightning_fedpeft.models import PEFTConfig, apply_peft, load_backbone, resolve_model_path
from lightning_fedpeft.module import FedPEFTModule
from lightning_fedpeft.state import load_trainable_state, state_nbytes, trainable_state
from lightning_fedpeft.tuners.adapter import AdapterConfig, inject_adapters

MINILM = resolve_model_path("minilm")


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 5000, (3, 12), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_adapter_at_init_leaves_the_output_unchanged() -> None:
    torch.manual_seed(0)
    model = load_backbone(MINILM, num_labels=4, num_hidden_layers=2).eval()
    with torch.no_grad():
        before = model(**_inputs()).logits.clone()
    injection = inject_adapters(model, AdapterConfig(depth=2, width=16))
    assert len(injection.adapters) == 2
    with torch.no_grad():
        after = model(**_inputs()).logits
    assert torch.allclose(before, after, atol=1e-6)
    # ...and the adapters really are in the forward path: a non-zero up-projection changes the output.
    with torch.no_grad():
        # Random, not constant: a constant shift of every hidden unit would be removed by the LayerNorm after it.
        torch.nn.init.normal_(injection.adapters[1].up.weight, std=0.5)
        changed = model(**_inputs()).logits
    assert not torch.allclose(before, changed, atol=1e-4)


def test_adapter_depth_picks_the_top_layers_and_freezes_the_rest() -> None:
    model = apply_peft(load_backbone(MINILM, num_labels=3), PEFTConfig("adapter", depth=2, width=8))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(
        n.startswith(("bert.encoder.layer.4.output.adapter", "bert.encoder.layer.5.output.adapter", "classifier"))
        for n in names
    ), names
    assert any(n.startswith("classifier") for n in names)
    assert {n.split(".")[3] for n in names if "adapter" in n} == {"4", "5"}


@pytest.mark.parametrize("method", ["adapter", "freeze"])
def test_default_depth_is_every_layer_of_the_model_even_a_cut_one(method: str) -> None:
    module = FedPEFTModule(num_labels=3, num_hidden_layers=2, method=method)
    trained = {n.split(".")[3] for n, p in module.model.named_parameters() if p.requires_grad and ".layer." in n}
    assert trained == {"0", "1"}


@pytest.mark.parametrize("method", ["adapter", "lora", "svd", "full"])
def test_trainable_state_round_trip(method: str) -> None:
    module = FedPEFTModule(num_labels=3, num_hidden_layers=2, method=method, depth=1, width=8, rank=2)
    state = trainable_state(module)
    assert state and all(p.requires_grad for n, p in module.named_parameters() if n in state)
    assert any("classifier" in n for n in state), "the classification head must always train"
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    perturbed = {n: t + torch.randn_like(t) for n, t in state.items()}
    load_trainable_state(module, perturbed)
    back = trainable_state(module)
    assert all(torch.equal(back[n], perturbed[n]) for n in state)
    assert all(torch.equal(p, frozen[n]) for n, p in module.named_parameters() if not p.requires_grad)
    assert state_nbytes(state) == sum(t.numel() * 4 for t in state.values())
    if method != "full":
        total = sum(p.numel() for p in module.parameters())
        assert sum(t.numel() for t in state.values()) < 0.05 * total


def test_svd_method_uses_peft_adalora_layers_with_orthogonality_penalty() -> None:
    module = FedPEFTModule(num_labels=3, num_hidden_layers=2, method="svd", rank=4)
    names = list(trainable_state(module))
    kinds = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "layer.1.output.dense")
    for kind in kinds:
        assert any(kind in n and "lora_E" in n for n in names), kind
    module.model.eval()  # no dropout noise between the two forward passes
    batch = _inputs() | {"labels": torch.tensor([0, 1, 2])}
    with_penalty = module.model(**batch).loss
    module.model.peft_config["default"].orth_reg_weight = 0.0
    without = module.model(**batch).loss
    assert with_penalty > without


def test_load_trainable_state_rejects_wrong_names_and_shapes() -> None:
    module = FedPEFTModule(num_labels=3, num_hidden_layers=2, method="adapter", depth=1, width=4)
    state = trainable_state(module)
    name = next(iter(state))
    with pytest.raises(KeyError):
        load_trainable_state(module, {k: v for k, v in state.items() if k != name})
    with pytest.raises(ValueError, match=name):
        load_trainable_state(module, state | {name: torch.zeros(1)})


def _labelled() -> dict[str, torch.Tensor]:
    return _inputs() | {"labels": torch.arange(3) % 2}


def test_the_activation_cache_is_on_by_default_where_adapters_leave_a_frozen_bottom() -> None:
    # Adapters in the top layer of two: the default ("auto") caches layer 0's output, in float16.
    module = FedPEFTModule(num_labels=2, num_hidden_layers=2, method="adapter", depth=1, width=4)
    cache = module.activation_cache
    assert cache is not None and cache.dtype == torch.float16
    module.training_step(_labelled(), 0)
    module.training_step(_labelled(), 1)
    assert (cache.misses, cache.hits, cache.last["boundary"]) == (3, 3, 1)
    # Nothing frozen below the trained layers: the cache stands aside (no entries), whatever the setting.
    everywhere = FedPEFTModule(num_labels=2, num_hidden_layers=2, method="adapter", depth=2, width=4)
    everywhere.training_step(_labelled(), 0)
    assert len(everywhere.activation_cache) == 0 and everywhere.activation_cache.last["boundary"] == 0
    # Off where it cannot pay or cannot serve: full fine-tuning, and when turned off.
    assert FedPEFTModule(num_labels=2, num_hidden_layers=2, method="full").activation_cache is None
    off = FedPEFTModule(num_labels=2, num_hidden_layers=2, method="adapter", depth=1, activation_cache_mb=None)
    assert off.activation_cache is None


def test_an_encoder_the_cache_cannot_serve_is_uncached_by_default_and_refused_when_asked(tmp_path) -> None:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=200, dim=32, n_layers=2, n_heads=4, hidden_dim=64, num_labels=2)
    DistilBertForSequenceClassification(config).save_pretrained(tmp_path)
    # DistilBERT keeps its layers under `transformer`, not `encoder`: "auto" leaves the cache off...
    lora = {"num_labels": 2, "method": "lora", "target_modules": ["q_lin", "v_lin"], "pooling": "model"}
    module = FedPEFTModule(str(tmp_path), **lora)
    assert module.activation_cache is None
    # ...and an explicit size says why, naming the setting and the fix.
    with pytest.raises(ValueError, match=r"model\.activation_cache_mb: .*embeddings.*null"):
        FedPEFTModule(str(tmp_path), **lora, activation_cache_mb=64)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"activation_cache_mb": 0}, r"activation_cache_mb=0 must be positive"),
        ({"activation_cache_mb": "big"}, r"activation_cache_mb='big': give a size in MiB, 'auto' or null"),
        ({"activation_cache_dtype": "int8"}, r"activation_cache_dtype='int8' is not one of float32"),
    ],
)
def test_bad_activation_cache_settings_name_the_field(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FedPEFTModule(num_labels=2, num_hidden_layers=2, **settings)
