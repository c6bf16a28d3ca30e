"""Decoder language models: instruction data, response-only loss, what travels, federated runs, bad input.

Everything runs on a tiny random Llama built in the test session (conftest.build_tiny_llama: 2 layers,
hidden 32, tied embeddings, MiniLM's tokenizer), so nothing is downloaded and nothing big is loaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_fedpeft import FederatedTextDataModule, FedPEFTModule, ModulePruning, RankAllocation, RoundSync
from lightning_fedpeft.instructions import PromptRenderer, tokenize_pairs
from lightning_fedpeft.state import trainable_state


def _clinc(tokenizer: str, cache_dir: str, **settings: Any) -> FederatedTextDataModule:
    """CLINC150 as a built-in instruction task: 'which intent?' answered by the intent's name."""
    defaults = {
        "task": "causal_lm",
        "corpus": "clinc",
        "tokenizer": tokenizer,
        "max_length": 40,
        "num_clients": 6,
        "partitioner": "iid",
        "max_train_examples": 240,
        "max_val_examples": 32,
        "max_test_examples": 32,
        "batch_size": 8,
        "eval_batch_size": 16,
        "cache_dir": cache_dir,
    }
    return FederatedTextDataModule(**(defaults | settings))


def _decoder(path: str, method: str = "lora", **settings: Any) -> FedPEFTModule:
    torch.manual_seed(0)
    return FedPEFTModule(path, task="causal_lm", method=method, rank=4, lr=1e-2, **settings)


def test_the_loss_is_on_the_response_tokens_only(tiny_llama: str, cache_dir: str) -> None:
    data = _clinc(tiny_llama, cache_dir)
    data.setup()
    items = [data.datasets["train"][i] for i in range(4)]
    batch = data.collate(items)
    for row, (ids, prompt_len) in enumerate(items):
        assert (batch["labels"][row, :prompt_len] == -100).all()  # the prompt: never a target
        assert torch.equal(batch["labels"][row, prompt_len : len(ids)], ids[prompt_len:])  # the answer: all of it
        assert (batch["labels"][row, len(ids) :] == -100).all()  # padding
    module = _decoder(tiny_llama).eval()
    with torch.no_grad():
        loss = module.model(**batch).loss
        logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # By hand: cross-entropy of each answer token given what comes before it, and nothing else.
    targets = batch["labels"][:, 1:]
    chosen = targets != -100
    by_hand = torch.nn.functional.cross_entropy(logits[:, :-1][chosen], targets[chosen])
    torch.testing.assert_close(loss, by_hand)
    # Changing a prompt's own target labels (they are not targets) changes nothing.
    with torch.no_grad():
        relabelled = dict(batch, labels=batch["labels"].clone())
        relabelled["labels"][0, 0] = -100
        torch.testing.assert_close(module.model(**relabelled).loss, loss)


def test_a_chat_template_frames_the_prompt_and_the_answer_ends_the_turn(tiny_chat_llama: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_llama)
    renderer = PromptRenderer(tok, system_prompt="be brief")
    head, answer = renderer.texts("what is my balance", "balance")
    assert head == "<system> be brief [SEP]<user> what is my balance [SEP]<assistant> "
    assert answer == "balance [SEP]"  # the answer and the template's end of turn: learned and generated
    ids, prompt_lens, cut = tokenize_pairs(renderer, ["what is my balance"], ["balance"], max_length=64)
    assert cut == 0 and tok.decode(ids[0][prompt_lens[0] :]) == "balance [SEP]"


def test_a_long_prompt_is_cut_but_never_its_answer(tiny_chat_llama: str) -> None:
    from transformers import AutoTokenizer

    renderer = PromptRenderer(AutoTokenizer.from_pretrained(tiny_chat_llama))
    prompts = ["short one", " ".join(["word"] * 200)]
    ids, prompt_lens, cut = tokenize_pairs(renderer, prompts, ["yes", "transfer money"], max_length=24)
    assert cut == 1 and all(len(x) <= 24 for x in ids)
    tok = renderer.tokenizer
    assert tok.decode(ids[1][prompt_lens[1] :]) == "transfer money [SEP]"  # the answer is whole
    assert tok.decode(ids[1][: prompt_lens[1]]).endswith("[SEP] < assistant >")  # the template is whole
    with pytest.raises(ValueError, match=r"data\.max_length=12 cannot hold example 1's answer \(11 tokens\)"):
        tokenize_pairs(renderer, ["a", "b"], ["yes", " ".join(["answer"] * 10)], max_length=12)


@pytest.mark.parametrize("method", ["lora", "svd", "full"])
def test_only_the_tuned_part_travels_and_never_the_tied_embedding(method: str, tiny_llama: str) -> None:
    module = _decoder(tiny_llama, method)
    state = trainable_state(module)
    embedding = module.model.get_input_embeddings().weight
    assert embedding is module.model.get_output_embeddings().weight  # tied: one tensor, read and written
    assert not embedding.requires_grad and not any("embed_tokens" in k or "lm_head" in k for k in state)
    kinds = {"lora": {"lora_A", "lora_B"}, "svd": {"lora_A", "lora_B", "lora_E"}}
    if method in kinds:
        # ...q_proj.lora_A.default.weight (LoRA), ...q_proj.lora_E.default (AdaLoRA's SVD triplets)
        assert {re.search(r"\.(lora_[ABE])\.", k).group(1) for k in state} == kinds[method]
        for target in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            assert any(f".{target}." in k for k in state), target  # the seven Llama kinds by default
    else:
        assert any("layers.0.self_attn.q_proj.weight" in k for k in state)


def test_three_federated_rounds_lower_the_validation_loss(tiny_llama: str, cache_dir: str, trainer_factory) -> None:
    data = _clinc(tiny_llama, cache_dir)
    pl.seed_everything(0)
    module = _decoder(tiny_llama, max_new_tokens=4)
    sync = RoundSync(clients_per_round=3, seed=0)
    trainer = trainer_factory(max_epochs=3, callbacks=[sync])
    trainer.fit(module, datamodule=data)
    losses = [row["val_loss"] for row in sync.history]
    assert losses[-1] < losses[0], losses
    assert all({"val_ppl", "val_exact_match"} <= set(row) for row in sync.history)
    for row in sync.history:  # perplexity is the exponential of the (response-token) loss
        assert row["val_ppl"] == pytest.approx(torch.tensor(row["val_loss"]).exp().item(), rel=0.05)
    (test,) = trainer.test(module, datamodule=data, verbose=False)
    # The logged exact match is the share of test answers that match, counted here by hand.
    module.eval()
    matches = torch.cat([module._exact_matches(batch) for batch in data.test_dataloader()])
    assert test["test_exact_match"] == pytest.approx(float(matches.mean())) and test["test_loss"] > 0


def test_exact_match_counts_a_greedy_answer_that_is_the_reference(tiny_llama: str, cache_dir: str) -> None:
    data = _clinc(tiny_llama, cache_dir)
    data.setup()
    module = _decoder(tiny_llama, max_new_tokens=6).eval()
    batch = data.eval_collate([data.datasets["dev"][i] for i in range(4)])
    with torch.no_grad():
        generated = module.model.generate(
            input_ids=batch["prompt_input_ids"],
            attention_mask=batch["prompt_attention_mask"],
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
        )[:, batch["prompt_input_ids"].shape[1] :]
    assert module._exact_matches(batch).tolist() == [0.0] * 4  # a random model does not know the intents
    # Make the reference answers what the model generates (up to [SEP]): every one now matches.
    answers = torch.full_like(generated, -100)
    for row, tokens in enumerate(generated.tolist()):
        until = tokens.index(102) if 102 in tokens else len(tokens)
        answers[row, :until] = torch.tensor(tokens[:until])
    assert module._exact_matches(dict(batch, answer_ids=answers)).tolist() == [1.0] * 4


def test_fedara_allocates_ranks_and_prunes_modules_on_a_decoder(
    tiny_llama: str, cache_dir: str, trainer_factory
) -> None:
    data = _clinc(tiny_llama, cache_dir)
    pl.seed_everything(0)
    module = _decoder(tiny_llama, "svd", max_new_tokens=0)
    sync = RoundSync(clients_per_round=3, seed=0, eval_every=10)
    allocation = RankAllocation(target_rank=0.5, warmup_rounds=1, final_rounds=1)
    trainer = trainer_factory(max_epochs=4, callbacks=[sync, allocation, ModulePruning()])
    trainer.fit(module, datamodule=data)
    rows = sync.history
    assert rows[0]["active_ranks"] == 2 * 7 * 4 and rows[-1]["active_ranks"] == 7  # 14 modules x rank 4 -> 0.5 each
    assert rows[-1]["live_modules"] < 14 and rows[-1]["bytes_up"] < rows[0]["bytes_up"] / 3
    assert rows[-1]["lowest_live_layer"] in (0.0, 1.0)  # Llama's ".layers.N." names are read too
    assert {"step_time_ms", "peak_rss_mb"} <= set(rows[-1])


def test_a_client_column_gives_one_client_per_value(tmp_path: Path, tiny_llama: str, cache_dir: str) -> None:
    users = ["ana", "bo", "cy"]
    rows = [{"user": users[i % 3], "instruction": f"say {i}", "input": "", "output": f"number {i}"} for i in range(30)]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = FederatedTextDataModule(
        task="causal_lm",
        corpus=None,
        train_file=str(path),
        tokenizer=tiny_llama,
        partitioner="natural",
        client_column="user",
        val_fraction=0.2,
        max_length=32,
        cache_dir=cache_dir,
    )
    assert data.num_clients == 3
    prompts, responses, clients = data._raw["train"]
    for client, indices in enumerate(data.client_indices):
        assert {clients[i] for i in indices} == {sorted(users)[client]}  # one user's rows, all of them
    assert sum(len(ix) for ix in data.client_indices) == 24
    assert prompts[0].startswith("say ") and responses[0].startswith("number ")  # the Alpaca layout, read as such


def test_bad_instruction_input_names_the_setting(tmp_path: Path, tiny_llama: str, cache_dir: str) -> None:
    def data(path: Path, **settings: Any) -> FederatedTextDataModule:
        args = {"task": "causal_lm", "corpus": None, "train_file": str(path), "tokenizer": tiny_llama}
        return FederatedTextDataModule(**(args | {"cache_dir": cache_dir} | settings))

    missing = tmp_path / "missing.csv"
    missing.write_text("prompt,answer\nhi,hello\n")
    with pytest.raises(ValueError, match=r"data\.response_column='response' is not a column.*\['prompt', 'answer'\]"):
        data(missing)
    empty = tmp_path / "empty.csv"
    empty.write_text("prompt,response\nhi,hello\nbye,\n")
    with pytest.raises(ValueError, match=r"data\.response_column='response' is empty in 1 rows.*data row 2"):
        data(empty)
    commas = tmp_path / "commas.tsv"
    commas.write_text("id,utterance,intent\n1,hi,greet\n")
    with pytest.raises(ValueError, match=r"commas\.tsv is comma-separated .* rename it to commas\.csv"):
        data(commas, prompt_column="utterance", response_column="intent")
    with pytest.raises(ValueError, match=r"model\.task='causal_lm' needs a decoder.*BertModel"):
        FedPEFTModule("minilm", task="causal_lm", method="lora")
    with pytest.raises(ValueError, match=r"model\.task='classification' trains an encoder.*LlamaForCausalLM"):
        FedPEFTModule(tiny_llama, task="classification", num_labels=3, method="lora")
    with pytest.raises(ValueError, match="activation_cache_mb"):
        FedPEFTModule(tiny_llama, task="causal_lm", method="adapter", activation_cache_mb=8)


def test_adapters_on_a_decoder_sit_after_its_feed_forward_and_start_as_the_identity(tiny_llama: str) -> None:
    plain = _decoder(tiny_llama, "full").eval()
    module = _decoder(tiny_llama, "adapter", depth=1, width=8).eval()
    state = trainable_state(module)
    assert state and all(".layers.1.mlp.adapter." in k for k in state)  # the top layer's, after down_proj
    ids = torch.randint(1000, 5000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(module.model(input_ids=ids).logits, plain.model(input_ids=ids).logits)


@pytest.mark.parametrize(
    ("kind", "targets"),
    [
        ("qwen2", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        ("mistral", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        ("gemma", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        ("gemma3_text", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        ("gpt2", {"c_attn", "c_proj", "c_fc"}),
    ],
)
def test_default_lora_targets_of_other_decoders(kind: str, targets: set[str]) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from lightning_fedpeft.models import PEFTConfig, apply_peft

    small = {"vocab_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "tie_word_embeddings": True}
    if kind == "gpt2":
        config = AutoConfig.for_model(kind, n_embd=16, n_layer=2, n_head=2, vocab_size=128, n_positions=32)
    else:
        config = AutoConfig.for_model(kind, hidden_size=16, intermediate_size=32, num_key_value_heads=1, **small)
        if kind.startswith("gemma"):
            config.head_dim = 8
    model = apply_peft(AutoModelForCausalLM.from_config(config), PEFTConfig("lora", rank=2), task="causal_lm")
    state = trainable_state(model)
    assert {re.search(r"\.([a-z_]+)\.lora_[AB]\.", k).group(1) for k in state} == targets
    assert not model.get_input_embeddings().weight.requires_grad


def test_a_decoder_on_a_fleet_gets_nested_prefixes_and_ranks_per_device(
    tiny_llama: str, cache_dir: str, trainer_factory
) -> None:
    # The cost model prices a decoder's step (its layer stack and input embeddings; the activation cache,
    # an encoder's, is the only part that needs an encoder), so the fleet budgets work on decoders too.
    from lightning_fedpeft import HeterogeneousLoRA
    from lightning_fedpeft.cost import CostModel
    from lightning_fedpeft.fleet import Fleet

    def fleet_sync() -> RoundSync:
        fleet = Fleet(fractions={"rpi4b": 0.5, "orin_nano": 0.5})
        return RoundSync(clients_per_round=3, seed=0, eval_every=10, cost_model=CostModel(fleet=fleet))

    data = _clinc(tiny_llama, cache_dir)
    pl.seed_everything(0)
    sync = fleet_sync()
    allocation = RankAllocation(target_rank=0.5, warmup_rounds=1, final_rounds=0)
    trainer_factory(max_epochs=2, callbacks=[sync, allocation]).fit(_decoder(tiny_llama, "svd", max_new_tokens=0), data)
    first = sync.history[0]
    assert first["active_ranks"] == 56 and first["min_client_triplets"] < first["mean_client_triplets"] < 56
    assert first["pred_saved_s"] > 0 and all(r["sim_round_s"] > 0 for r in sync.history)

    sync = fleet_sync()
    hetero = HeterogeneousLoRA(ranks={"rpi4b": 1, "orin_nano": 4})
    trainer_factory(max_epochs=2, callbacks=[sync, hetero]).fit(_decoder(tiny_llama, max_new_tokens=0), data)
    assert all(1 <= r["mean_client_rank"] <= 4 for r in sync.history) and sync.history[0]["sim_round_s"] > 0
