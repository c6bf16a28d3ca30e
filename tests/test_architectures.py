"""An MPNet-shaped model (the packaged BERT-base-scale one's architecture), tiny and random: no weights needed."""

from __future__ import annotations

import pytest
import torch
from transformers import MPNetConfig, MPNetForSequenceClassification

from lightning_fedpeft.cache import ActivationCache
from lightning_fedpeft.models import MeanPooledHead, PEFTConfig, apply_peft, use_mean_pooling
from lightning_fedpeft.state import trainable_state


def _tiny_mpnet() -> MPNetForSequenceClassification:
    torch.manual_seed(0)
    config = MPNetConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, num_labels=3
    )
    return MPNetForSequenceClassification(config).eval()


def _batch(pad: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 17, 33, 9, 41], [7, 8, 60, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    if pad:
        ids = torch.cat([ids, torch.ones(2, pad, dtype=ids.dtype)], dim=1)
        mask = torch.cat([mask, torch.zeros(2, pad, dtype=mask.dtype)], dim=1)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2])}


def test_mean_pooling_replaces_the_first_token_head_with_one_linear_layer_on_the_masked_mean() -> None:
    model = use_mean_pooling(_tiny_mpnet())
    assert isinstance(model.classifier, MeanPooledHead)
    assert sorted(n for n, _ in model.classifier.named_parameters()) == ["out_proj.bias", "out_proj.weight"]
    batch = _batch()
    with torch.no_grad():
        logits = model(**batch).logits
        hidden = model.mpnet(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        w = batch["attention_mask"].unsqueeze(-1).float()
        expected = model.classifier.out_proj((hidden * w).sum(1) / w.sum(1))
        padded = model(**_batch(pad=3)).logits
    assert torch.allclose(logits, expected, atol=1e-5)
    assert torch.allclose(logits, padded, atol=1e-5), "padding must not move the pooled state"


_ALL_SIX = {"attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o"}
_ALL_SIX |= {"intermediate.dense", "output.dense"}
_QUERY_VALUE = {"attention.attn.q", "attention.attn.v"}


@pytest.mark.parametrize(("method", "expected"), [("svd", _ALL_SIX), ("lora", _QUERY_VALUE)])
def test_default_targets_follow_the_architecture(method: str, expected: set[str]) -> None:
    model = apply_peft(use_mean_pooling(_tiny_mpnet()), PEFTConfig(method, rank=2))
    adapted = {n.split(".lora_")[0].split("layer.0.")[1] for n in trainable_state(model) if "layer.0." in n}
    assert adapted == expected


def test_target_names_matching_no_layer_are_rejected_with_the_names_there_are() -> None:
    with pytest.raises(ValueError, match=r"target_modules \['query'\] match no linear layer.*'attention\.attn\.q'"):
        apply_peft(_tiny_mpnet(), PEFTConfig("lora", target_modules=["query", "attn.v"]))


def test_adapters_and_the_activation_cache_work_on_mpnet() -> None:
    model = apply_peft(use_mean_pooling(_tiny_mpnet()), PEFTConfig("adapter", depth=1, width=4))
    torch.nn.init.normal_(model.adapter_injection.adapters[2].up.weight, std=0.3)  # not the identity
    assert {n.split(".")[3] for n in trainable_state(model) if ".adapter." in n} == {"2"}
    batch = _batch()
    plain = model(**batch).loss
    cache = ActivationCache(max_mb=1, dtype="float32")  # the architecture's path, not float16 rounding
    cache(model, batch)  # fills layers 0..1 for both texts
    cached = cache(model, batch)
    assert cache.hits == 2 and cache.misses == 2
    assert torch.allclose(plain, cached.loss, atol=1e-6)


def test_the_longest_input_is_read_off_the_position_table() -> None:
    from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from lightning_fedpeft.models import max_input_tokens

    small = {"num_hidden_layers": 1, "vocab_size": 64}
    mpnet = MPNetForSequenceClassification(
        MPNetConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32, max_position_embeddings=40, **small)
    )
    ids = torch.arange(3, 41).clamp(max=60).unsqueeze(0)  # 38 tokens: MPNet offsets positions past its padding id 1
    assert max_input_tokens(mpnet) == 38 and mpnet(input_ids=ids).logits.shape[0] == 1
    with pytest.raises((IndexError, RuntimeError)):
        mpnet(input_ids=torch.cat([ids, ids[:, :1]], dim=1))  # one more fails, as the check says
    gpt2 = GPT2ForSequenceClassification(GPT2Config(n_embd=16, n_head=2, n_positions=24, n_layer=1, vocab_size=64))
    assert max_input_tokens(gpt2) == 24
    llama = LlamaForCausalLM(
        LlamaConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32, max_position_embeddings=24, **small)
    )
    assert max_input_tokens(llama) is None  # rotary positions: no table to run off
