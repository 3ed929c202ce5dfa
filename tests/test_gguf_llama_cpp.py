"""GGUF exports read by llama.cpp itself: the file loads, tokenizes as transformers does, generates sensible text, its
llama-perplexity matches transformers' GGUF reader on the same file, and the K-quant mixes choose the tensor types
llama-quantize chooses.

Needs a llama.cpp build: LLAMA_CPP_BIN names the folder holding llama-perplexity, llama-simple, llama-tokenize and
llama-quantize (README, "llama.cpp"); without it these tests skip, naming the variable.
"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from optional_extras import import_optional
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_ptq
from hf_ptq import PtqConfig

BIN = Path(os.environ["LLAMA_CPP_BIN"]) if os.environ.get("LLAMA_CPP_BIN") else None
pytestmark = [
    pytest.mark.skipif(BIN is None, reason="set LLAMA_CPP_BIN to a llama.cpp build's bin folder to run these"),
    pytest.mark.extra("gguf"),
]
gguf = import_optional("gguf")  # None without the extra: every test here is skipped then

CTX = 512
CHUNKS = 3
# Written for this test (no corpus text in the repository): plain English prose for the perplexity slice.
PROSE = (
    "The river runs past the old mill and under the stone bridge before it reaches the town. In spring the water "
    "rises with the melting snow from the hills, and the fields on either side turn green within a few weeks. "
    "Farmers bring their goods to the market square every Saturday morning, where bread, cheese, apples and honey "
    "are sold from wooden stalls. Children play by the fountain while their parents talk about the weather, the "
    "price of grain and the news from the capital. In the evening the lamps are lit along the main street, and the "
    "sound of music drifts from the inn near the church. "
)


def run(tool: str, *args: str, timeout: int = 600) -> str:
    done = subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{tool} failed ({done.returncode}):\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def smollm2_rtn(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct quantized with RTN w4 g32 asymmetric (seconds) and saved with its tokenizer."""
    from hf_ptq.default_model import smollm2_checkpoint

    source = smollm2_checkpoint()
    folder = tmp_path_factory.mktemp("smollm2-rtn")
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=PtqConfig(bits=4, group_size=32))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def transformers_perplexity(path: Path, tokens: list[int]) -> float:
    """llama-perplexity's protocol in transformers: chunks of CTX tokens, the second half of each scored."""
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    nll, count = 0.0, 0
    with torch.no_grad():
        for c in range(CHUNKS):
            chunk = torch.tensor([tokens[c * CTX : (c + 1) * CTX]])
            logits = model(chunk).logits[0].float()
            first = CTX // 2
            logp = torch.log_softmax(logits[first : CTX - 1], -1)
            nll -= logp.gather(1, chunk[0, first + 1 :, None]).sum().item()
            count += CTX - 1 - first
    return math.exp(nll / count)


def llama_perplexity(path: Path, text_file: Path) -> float:
    for _ in range(6):  # llama.cpp logs from a thread: about one fast run in six here lost its last lines
        out = run("llama-perplexity", "-m", str(path), "-f", str(text_file), "-c", str(CTX), "--chunks", str(CHUNKS))
        lines = [line for line in out.splitlines() if "Final estimate: PPL" in line]
        if lines:
            break
    assert lines, f"llama-perplexity printed no estimate:\n{out[-2000:]}"
    line = lines[0]
    return float(line.split("=")[1].split()[0])


def assert_same_perplexity(path: Path, tokenizer, text: str, tmp_path: Path) -> None:
    """llama-perplexity of `path` on `text` within 1 % of transformers' GGUF reader scoring the same file alike."""
    tokens = tokenizer(text)["input_ids"]
    assert len(tokens) >= CHUNKS * CTX
    (tmp_path / "text.txt").write_text(text)
    theirs = llama_perplexity(path, tmp_path / "text.txt")
    ours = transformers_perplexity(path, tokens)
    assert abs(theirs - ours) / ours < 0.01, (theirs, ours)


@pytest.mark.parametrize("gguf_type", ["auto", "q8_0", "q4_0", "q4_1", "q4_k_m", "q5_k_m", "q6_k"])
def test_llama_cpp_runs_the_export(gguf_type, smollm2_rtn, tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_rtn)
    folder = hf_ptq.export(str(smollm2_rtn), tmp_path / "gguf", format="gguf", gguf_type=gguf_type)
    (path,) = folder.glob("*.gguf")

    prompt = "The capital of France is"
    ids = run("llama-tokenize", "-m", str(path), "-p", prompt, "--ids", "--log-disable").strip().splitlines()[-1]
    assert [int(i) for i in ids.strip("[]").split(",")] == tokenizer(prompt)["input_ids"]

    generated = run("llama-simple", "-m", str(path), "-n", "12", prompt)
    assert "Paris" in generated, generated[-500:]

    assert_same_perplexity(path, tokenizer, PROSE * 40, tmp_path)


def test_llama_cpp_runs_a_model_quantized_on_the_presets_own_grids(tmp_path) -> None:
    """SmolLM2 quantized with `gguf_layer_schemes(..., "q4_k_m")` (5-bit, 6-bit, 8-bit and 4-bit layers) exports to
    Q4_K_M with llama-quantize's tensor types, and llama.cpp runs it as transformers' reader does."""
    from hf_ptq.default_model import smollm2_checkpoint

    source = smollm2_checkpoint()
    cfg = PtqConfig(bits=4, group_size=32, layer_schemes=hf_ptq.gguf_layer_schemes(source, "q4_k_m"))
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=cfg)
    tokenizer = AutoTokenizer.from_pretrained(source)
    folder = hf_ptq.export(model, tmp_path / "gguf", format="gguf", gguf_type="q4_k_m", tokenizer=tokenizer)
    (path,) = folder.glob("*.gguf")
    reader = gguf.GGUFReader(path)
    kinds = {t.tensor_type.name for t in reader.tensors}
    assert {"Q5_0", "Q8_0", "Q4_K", "Q6_K"} <= kinds
    assert "quantized again" not in reader.fields["hf_ptq.encoding"].contents()
    generated = run("llama-simple", "-m", str(path), "-n", "12", "The capital of France is")
    assert "Paris" in generated, generated[-500:]
    assert_same_perplexity(path, tokenizer, PROSE * 40, tmp_path)


def test_k_quant_mixes_choose_the_types_llama_quantize_chooses(smollm2_rtn, tmp_path) -> None:
    """llama-quantize's Q4_K_M of our F16-embedding Q8_0 file types every tensor as our own q4_k_m export does."""
    reference = hf_ptq.export(str(smollm2_rtn), tmp_path / "q8", format="gguf", gguf_type="q8_0")
    (source,) = reference.glob("*.gguf")
    for preset in ("q4_k_m", "q5_k_m", "q4_k_s"):
        theirs = tmp_path / f"theirs-{preset}.gguf"
        run("llama-quantize", "--allow-requantize", str(source), str(theirs), preset.upper())
        ours = hf_ptq.export(str(smollm2_rtn), tmp_path / preset, format="gguf", gguf_type=preset)
        (mine,) = ours.glob("*.gguf")
        expected = {t.name: t.tensor_type.name for t in gguf.GGUFReader(theirs).tensors}
        got = {t.name: t.tensor_type.name for t in gguf.GGUFReader(mine).tensors}
        assert got == expected, preset


def test_llama_cpp_tokenizes_sentencepiece_style_vocabularies_as_transformers(tmp_path) -> None:
    from conftest import FAMILIES
    from test_export_gguf import TEXTS, sentencepiece_style_tokenizer

    tokenizer = sentencepiece_style_tokenizer()
    config = FAMILIES["llama"].make_config()
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = hf_ptq.quantize(AutoModelForCausalLM.from_config(config), PtqConfig(group_size=32))
    folder = hf_ptq.export(model, tmp_path / "gguf", format="gguf", tokenizer=tokenizer)
    (path,) = folder.glob("*.gguf")
    for text in [*TEXTS, "Hello world, it's 12345 o'clock", "  two  spaces\tand a tab"]:
        out = run("llama-tokenize", "-m", str(path), "-p", text, "--ids", "--log-disable").strip().splitlines()[-1]
        assert [int(i) for i in out.strip("[]").split(",")] == tokenizer(text)["input_ids"], text


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "phi3"])
def test_llama_cpp_computes_what_transformers_computes_for_other_families(family, tmp_path) -> None:
    """Tiny random Qwen2 (q / k / v biases), Qwen3 (q / k norms), Mistral and Phi-3 (fused q / k / v, gate / up):
    llama-perplexity of the export equals transformers' reader's on the same file within 1 % (a wrong rotary layout,
    bias or norm would not)."""
    from conftest import FAMILIES
    from test_export_gguf import TEXTS, sentencepiece_style_tokenizer

    tokenizer = sentencepiece_style_tokenizer()
    config = FAMILIES[family].make_config()
    config.vocab_size = len(tokenizer)
    if family == "qwen2":
        config.attention_bias = True
    if family == "qwen3":
        config.head_dim = 128  # transformers' GGUF reader builds Qwen3 with its default head_dim
    torch.manual_seed(0)
    model = hf_ptq.quantize(AutoModelForCausalLM.from_config(config), PtqConfig(group_size=32))
    folder = hf_ptq.export(model, tmp_path / "gguf", format="gguf", tokenizer=tokenizer, gguf_type="q8_0")
    (path,) = folder.glob("*.gguf")
    assert_same_perplexity(path, tokenizer, " ".join(TEXTS[:1] + TEXTS[2:]) * 200, tmp_path)


def test_phi3_k_quant_mixes_choose_the_types_llama_quantize_chooses(tmp_path) -> None:
    """A tiny Phi-3 with rows of 256 inputs: its fused attn_qkv (Q5_K in Q4_K_M) and K-quant super-blocks typed as
    llama-quantize types them."""
    import transformers
    from test_export_gguf import sentencepiece_style_tokenizer

    tokenizer = sentencepiece_style_tokenizer()
    config = transformers.Phi3Config(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = hf_ptq.quantize(AutoModelForCausalLM.from_config(config), PtqConfig(group_size=32))
    source = hf_ptq.export(model, tmp_path / "q8", format="gguf", tokenizer=tokenizer, gguf_type="q8_0")
    (source_file,) = source.glob("*.gguf")
    for preset in ("q4_k_m", "q5_k_m", "q4_k_s"):
        theirs = tmp_path / f"theirs-{preset}.gguf"
        run("llama-quantize", "--allow-requantize", str(source_file), str(theirs), preset.upper())
        ours = hf_ptq.export(model, tmp_path / preset, format="gguf", tokenizer=tokenizer, gguf_type=preset)
        (mine,) = ours.glob("*.gguf")
        expected = {t.name: t.tensor_type.name for t in gguf.GGUFReader(theirs).tensors}
        got = {t.name: t.tensor_type.name for t in gguf.GGUFReader(mine).tensors}
        assert got == expected, preset
