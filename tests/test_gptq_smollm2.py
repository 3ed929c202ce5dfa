"""The real model: SmolLM2-135M-Instruct quantized with GPTQ w4 g64 on a little calibration text."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_ptq
from hf_ptq.default_model import smollm2_checkpoint

pytestmark = pytest.mark.slow

# Written for this test: plain English prose.
TEXT = (
    "Every spring the town council repaints the wooden benches along the harbour wall, and every summer the gulls "
    "undo their work. The fishermen leave before dawn and come back in the early afternoon, when the market hall "
    "fills with the smell of salt and diesel. Children sell lemonade to the tourists who wait for the ferry, and "
    "the old men who sit outside the café argue about football, the weather and the price of fuel. In the autumn "
    "the storms arrive from the west, the ferry stops running for days at a time, and the town returns to its own "
    "quiet rhythm of repairs, long dinners and stories told twice. The library opens on Tuesdays and Saturdays, "
    "and its single librarian knows which books every reader has borrowed for the last thirty years."
)


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits.float()
    return float(torch.exp(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])))


def test_gptq_smollm2_beats_rtn_and_round_trips(tmp_path) -> None:
    path = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    seq = 64
    cfg = hf_ptq.PtqConfig(
        method="gptq", bits=4, group_size=64, dataset=[TEXT], num_samples=2, seq_len=seq, true_sequential=False
    )
    gptq = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.bfloat16)
    rtn = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=hf_ptq.PtqConfig(method="rtn", bits=4, group_size=64), dtype=torch.bfloat16
    )
    assert isinstance(gptq.model.layers[29].mlp.down_proj, hf_ptq.QuantLinear)
    window = ids[:, : 2 * seq]  # the calibration tokens: GPTQ minimises the error on exactly these
    assert perplexity(gptq, window) < perplexity(rtn, window)

    gptq.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(gptq(ids[:, :32]).logits, reloaded(ids[:, :32]).logits)
