"""export(format="gguf"), read back by transformers' own GGUF reader (`from_pretrained(folder, gguf_file=...)`):
weights, logits, tokenizer and metadata."""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import pytest
import torch
from conftest import FAMILIES, rel_err
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_ptq
from hf_ptq import PtqConfig
from hf_ptq.nn import QuantLinear

TEXTS = [
    "The capital of France is Paris; 1234 + 5678 = 6912.",
    "<|im_start|>user\nWhat's up?<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces,\ttabs and ünïcödé 😀 — déjà vu",
]

# name: (config, gguf_type, GGUF type written, exact: the integers are written unchanged)
CASES = {
    "w4-g32-sym": (lambda: PtqConfig(bits=4, group_size=32, sym=True), "auto", "Q4_0", True),
    "w4-g64-asym": (lambda: PtqConfig(bits=4, group_size=64), "auto", "Q4_1", True),
    "int8": (lambda: PtqConfig(method="int8"), "auto", "Q8_0", True),
    "w4-channel-asym-to-q8_0": (lambda: PtqConfig(bits=4, group_size=-1), "q8_0", "Q8_0", True),
    "w3-g32-asym": (lambda: PtqConfig(bits=3, group_size=32), "auto", "Q4_1", True),
    "w4-g32-asym-to-q4_0": (lambda: PtqConfig(bits=4, group_size=32), "q4_0", "Q4_0", False),
    "hqq-w4-g64": (lambda: PtqConfig(method="hqq", bits=4, group_size=64), "auto", "Q4_1", True),  # float zeros
}


def gguf_file(folder: Path) -> Path:
    (path,) = folder.glob("*.gguf")
    return path


def dequantized_reference(model: torch.nn.Module, float_dir: Path) -> torch.nn.Module:
    """The float model (fp32) with hf_ptq's dequantized weights in place of the quantized layers."""
    reference = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32)
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            reference.get_submodule(name).weight.data = layer.dequantized_weight(torch.float32)
    return reference


def logits(model: torch.nn.Module, tokenizer, texts=TEXTS) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**tokenizer(t, return_tensors="pt")).logits[0].float() for t in texts])


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama (tied embeddings) saved with a byte-level BPE tokenizer of 320 tokens trained here: transformers'
    GGUF reader parses a small vocabulary in well under a second (SmolLM2's 49152 tokens take seconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    bpe.train_from_iterator(TEXTS * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    folder = tmp_path_factory.mktemp("small-llama")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(small_model_dir):
    return AutoTokenizer.from_pretrained(small_model_dir)


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_reads_the_export(case, small_model_dir, tokenizer, tmp_path, caplog) -> None:
    make_config, gguf_type, written, exact = CASES[case]
    model = AutoModelForCausalLM.from_pretrained(small_model_dir, quantization_config=make_config())
    with caplog.at_level(logging.WARNING):
        folder = hf_ptq.export(model, tmp_path / "gguf", format="gguf", gguf_type=gguf_type)
    path = gguf_file(folder)
    assert path.name == f"model-{written}.gguf" and ("quantized again" in caplog.text) != exact
    reader = gguf.GGUFReader(path)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == kinds["blk.1.ffn_down.weight"] == written
    assert kinds["token_embd.weight"] == "F16" and kinds["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in kinds  # tied embeddings: written once

    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name)
    reference = dequantized_reference(model, small_model_dir)
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            got, expected = loaded.get_submodule(name).weight.data, layer.dequantized_weight(torch.float32)
            if written == "Q4_1" and exact:  # the integers and scales exact, m = scale * offset rounded to fp16
                assert (got - expected).abs().max() <= expected.abs().max() * 2**-10, name
            elif exact:
                assert torch.equal(got, expected), name
    ours = logits(model, tokenizer)
    theirs = logits(loaded, tokenizer)
    if exact:
        # stated tolerances: 1e-6 relative L2 against the dequantized weights run in fp32 (Q4_0, Q8_0: only the
        # fp16 embedding differs), 1e-3 for Q4_1; 2 % against hf_ptq's own bf16 kernels
        assert rel_err(theirs, logits(reference, tokenizer)) < (1e-3 if written == "Q4_1" else 1e-6)
        assert rel_err(theirs, ours) < 0.02
    else:  # quantized a second time (asymmetric 4-bit into symmetric Q4_0)
        assert rel_err(theirs, ours) < 0.25


def test_smollm2_tokenizer_and_metadata_round_trip(tiny_llama_with_tokenizer_dir, tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_with_tokenizer_dir)  # SmolLM2-135M-Instruct's
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_with_tokenizer_dir, quantization_config=PtqConfig(group_size=32)
    )
    folder = hf_ptq.export(model, tmp_path / "gguf", format="gguf")  # the tokenizer saved with the model
    path = gguf_file(folder)
    theirs = AutoTokenizer.from_pretrained(folder, gguf_file=path.name)
    for text in TEXTS:
        assert theirs(text)["input_ids"] == tokenizer(text)["input_ids"], text
        assert theirs.decode(tokenizer(text)["input_ids"]) == text
    assert theirs.chat_template == tokenizer.chat_template
    assert (theirs.bos_token_id, theirs.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    fields = gguf.GGUFReader(path).fields

    def value(key):
        return fields[key].contents()

    cfg = model.config
    assert value("general.architecture") == "llama" and value("tokenizer.ggml.model") == "gpt2"
    assert value("tokenizer.ggml.pre") == "gpt2"  # SmolLM2's converted tokenizer splits as GPT-2 does
    assert value("llama.block_count") == cfg.num_hidden_layers and value("llama.embedding_length") == cfg.hidden_size
    assert value("llama.attention.head_count_kv") == cfg.num_key_value_heads
    assert value("llama.rope.dimension_count") == cfg.hidden_size // cfg.num_attention_heads
    assert value("general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_1
    assert len(value("tokenizer.ggml.tokens")) == cfg.vocab_size
    special = value("tokenizer.ggml.token_type")[tokenizer.convert_tokens_to_ids("<|im_start|>")]
    assert special == gguf.TokenType.CONTROL


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_other_llama_like_architectures(family, tokenizer, tmp_path) -> None:
    config = FAMILIES[family].make_config()
    config.vocab_size = len(tokenizer)
    if family == "qwen2":
        config.attention_bias = True  # Qwen2 has q / k / v biases (written as F32 tensors)
    if family == "qwen3":
        config.head_dim = 128  # transformers' GGUF reader builds Qwen3 with its default head_dim, 128
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path / "float")
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", quantization_config=PtqConfig(group_size=32, sym=True)
    )
    folder = hf_ptq.export(model, tmp_path / "gguf", format="gguf", tokenizer=tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file(folder).name)
    reference = dequantized_reference(model, tmp_path / "float")
    assert rel_err(logits(loaded, tokenizer), logits(reference, tokenizer)) < 1e-6


def test_unsupported_combinations_fail_before_writing(small_model_dir, tokenizer, tmp_path) -> None:
    out = tmp_path / "out"

    def fails(model, match, **kwargs):
        with pytest.raises(ValueError, match=match):
            hf_ptq.export(model, out, format="gguf", **kwargs)
        assert not out.exists() and not list(tmp_path.glob(".out-*"))

    load = AutoModelForCausalLM.from_pretrained
    act_order = PtqConfig(method="gptq", bits=4, group_size=32, num_samples=2, seq_len=16)
    fails(load(small_model_dir, quantization_config=act_order), "act-order groups")
    int8 = load(small_model_dir, quantization_config=PtqConfig(method="int8"))
    fails(int8, r"8-bit weights again to 4 bits.*'q8_0'", gguf_type="q4_0")
    fails(int8, "gguf_type must be one of auto, q8_0, q4_0, q4_1", gguf_type="q5_k")
    opt = hf_ptq.quantize(FAMILIES["opt"].build(), PtqConfig(group_size=32))
    fails(opt, "supports model types llama, mistral, qwen2, qwen3; this model is 'opt'", tokenizer=tokenizer)
    fails(hf_ptq.quantize(FAMILIES["llama"].build(), PtqConfig(group_size=32)), "found none saved with the model")
    with pytest.raises(ValueError, match="has no hf_ptq quantized layers"):
        hf_ptq.export(FAMILIES["llama"].build(), out, format="gguf", tokenizer=tokenizer)
