"""hf_ptq.evaluate: numbers against references written here, the data forms, the checklist, lm-eval glue."""

from __future__ import annotations

import importlib.machinery
import sys
import time
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES
from optional_extras import require_extra
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_ptq
from hf_ptq.evaluation import EvalResult, ModelStats, PeakMemory, Thresholds, perplexity, sliding_windows
from hf_ptq.evaluation.data import self_written_ids
from hf_ptq.evaluation.downstream import run_tasks
from hf_ptq.evaluation.memory import full_precision_weights
from hf_ptq.evaluation.result import MB

TEXT = (
    "The river rose through the night, and by morning the low fields were under water. Farmers moved their animals "
    "to the hill, where the old church stood, and waited for the rain to stop. "
) * 6


@pytest.fixture(scope="module")
def tiny(tiny_llama_with_tokenizer_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_with_tokenizer_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_with_tokenizer_dir)


@pytest.fixture(scope="module")
def quantized(tiny_llama_with_tokenizer_dir):
    cfg = hf_ptq.PtqConfig(method="rtn", bits=2, group_size=32)
    return AutoModelForCausalLM.from_pretrained(tiny_llama_with_tokenizer_dir, quantization_config=cfg).eval()


def recipe_perplexity(model, ids: torch.Tensor, max_length: int, stride: int) -> float:
    """transformers' perplexity guide, as written there: labels -100 on the context part of each window."""
    ids = ids.reshape(1, -1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + max_length, ids.shape[1])
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(input_ids).logits.float()
        labels = target_ids[:, 1:]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
        valid = int((labels != -100).sum())
        nll_sum, n_tokens = nll_sum + loss.item(), n_tokens + valid
        prev_end = end
        if end == ids.shape[1]:
            break
    return float(torch.tensor(nll_sum / n_tokens).exp())


@pytest.mark.parametrize(("max_length", "stride"), [(32, 32), (32, 8), (48, 17)])
def test_sliding_window_perplexity_matches_the_transformers_recipe(tiny, max_length, stride):
    model, tok = tiny
    ids = tok(TEXT, return_tensors="pt").input_ids[0]
    ours = perplexity(model, ids, max_length=max_length, stride=stride)
    assert ours == pytest.approx(recipe_perplexity(model, ids, max_length, stride), rel=1e-5)


def test_sliding_windows_score_each_token_once():
    def scored(n, length, stride):
        return [w.begin + i for w in sliding_windows(n, length, stride) for i in range(w.first, w.end - w.begin)]

    for n, length, stride in [(100, 32, 7), (5, 32, 16), (64, 64, 1), (100, 32, 31)]:  # overlapping: all but the first
        assert scored(n, length, stride) == list(range(1, n))
    # non-overlapping (the recipe with stride == max_length): a window's first token has no context and is not scored
    assert scored(100, 32, 32) == [i for i in range(100) if i % 32]
    assert len(sliding_windows(1000, 32, 16, max_windows=3)) == 3
    with pytest.raises(ValueError, match="stride=40 must be in"):
        sliding_windows(100, 32, 40)


def test_evaluate_measures_against_a_reference(tiny, quantized):
    model, tok = tiny
    result = hf_ptq.evaluate(
        quantized, tok, reference=model, data=TEXT, max_length=32, stride=16, new_tokens=4, speed_repeats=1
    )
    ids = tok(TEXT, return_tensors="pt").input_ids[0]
    assert result.perplexity == pytest.approx(recipe_perplexity(quantized, ids, 32, 16), rel=1e-5)
    assert result.reference.perplexity == pytest.approx(recipe_perplexity(model, ids, 32, 16), rel=1e-5)
    # KL and top-1 over exactly the scored positions, computed directly
    kl, agree, count = 0.0, 0, 0
    for w in sliding_windows(ids.numel(), 32, 16):
        window = ids[w.begin : w.end][None]
        with torch.no_grad():
            p = model(window).logits.float()[0, w.first - 1 : -1]
            q = quantized(window).logits.float()[0, w.first - 1 : -1]
        kl += F.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True, reduction="sum").item()
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        count += p.shape[0]
    assert result.tokens_scored == count == ids.numel() - 1  # overlapping windows: all but the first
    assert result.kl_divergence == pytest.approx(kl / count, rel=1e-4)
    assert result.top1_agreement == pytest.approx(agree / count)
    assert 0 < result.top1_agreement < 1 and result.kl_divergence > 0  # 2-bit: visibly different
    assert result.ppl_increase == pytest.approx(result.perplexity / result.reference.perplexity - 1)
    # speed, memory and size
    assert result.decode_tokens_per_s > 0 and result.prefill_tokens_per_s > 0
    assert result.model.memory_bytes == hf_ptq.evaluation.model_bytes(quantized)
    assert result.peak_memory_bytes >= result.model.memory_bytes
    assert result.memory_ratio == pytest.approx(result.model.memory_bytes / result.reference.memory_bytes)
    assert result.compression_ratio > 1


def test_evaluate_a_saved_folder_measures_load_time_and_checkpoint(tiny_llama_with_tokenizer_dir, quantized, tmp_path):
    quantized.save_pretrained(tmp_path / "q")
    result = hf_ptq.evaluate(
        tmp_path / "q",
        AutoTokenizer.from_pretrained(tiny_llama_with_tokenizer_dir),
        data=TEXT,
        max_length=32,
        speed=False,
    )
    on_disk = sum(f.stat().st_size for f in (tmp_path / "q").glob("*.safetensors"))
    assert result.checkpoint_bytes == on_disk and result.load_seconds > 0
    assert result.reference is None and result.kl_divergence is None
    assert all(c.passed is None for c in result.checklist())  # nothing to compare with: n/a, not a failure


def test_same_model_as_reference_is_lossless(tiny):
    model, tok = tiny
    result = hf_ptq.evaluate(model, tok, reference=model, data=TEXT, max_length=32, speed=False)
    assert result.kl_divergence == pytest.approx(0, abs=1e-6) and result.top1_agreement == 1.0
    assert result.perplexity == result.reference.perplexity


def test_every_data_form_gives_the_same_tokens(tiny, tmp_path):
    model, tok = tiny
    (tmp_path / "eval.txt").write_text(TEXT)
    ids = tok(TEXT, return_tensors="pt").input_ids[0]
    forms = [TEXT, str(tmp_path / "eval.txt"), tmp_path / "eval.txt", ids, [TEXT]]
    datasets = require_extra("datasets", "datasets")
    forms.append(datasets.Dataset.from_dict({"id": [0], "body": [TEXT]}))
    ppls = [
        hf_ptq.evaluate(model, tok, data=f, text_column="body", max_length=32, speed=False).perplexity for f in forms
    ]
    assert ppls == [ppls[0]] * len(forms)


def test_data_free_evaluation_uses_text_the_reference_wrote(tiny, quantized):
    model, tok = tiny
    result = hf_ptq.evaluate(quantized, tok, reference=model, max_length=64, speed=False)
    assert "written by the reference" in result.data
    assert result.tokens_scored == 4 * 96 - 6  # 4 prompts x 96 tokens, 6 windows of 64
    assert torch.equal(self_written_ids(model, tok, 8), self_written_ids(model, tok, 8))  # seeded


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_length": 0}, "max_length must be a positive integer"),
        ({"stride": 64, "max_length": 32}, "stride must be at most max_length=32"),
        ({"tasks": "hellaswag"}, "tasks must be a list"),
        ({"max_length": 4096}, "exceeds the model's context of 2048 tokens"),
        ({"data": 3.5}, "got float: pass a text file path"),
        ({"data": torch.tensor([5, 60000])}, "token id 60000 is outside the model's vocabulary of 49152: the tok"),
    ],
)
def test_bad_options_fail_with_the_field_named(tiny, kwargs, match):
    model, tok = tiny
    kwargs = {"data": TEXT, "speed": False} | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        hf_ptq.evaluate(model, tok, **kwargs)


def test_dataset_without_the_text_column(tiny):
    datasets = require_extra("datasets", "datasets")
    model, tok = tiny
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: \['body'\]\); pass text_column"):
        hf_ptq.evaluate(model, tok, data=datasets.Dataset.from_dict({"body": [TEXT]}), speed=False)


def stats(name, **kw) -> ModelStats:
    return ModelStats(name, **kw)


def test_checklist_thresholds():
    ref = stats("ref", perplexity=10.0, decode_tokens_per_s=20.0, memory_bytes=300, downstream={"a": 0.6, "b": 0.5})
    good = stats("q", perplexity=10.9, decode_tokens_per_s=31.0, memory_bytes=99, downstream={"a": 0.59, "b": 0.48})
    checks = EvalResult(good, ref).checklist()
    assert [c.passed for c in checks] == [True, True, True, True]
    assert [c.value for c in checks] == ["+9.0 %", "1.5 points", "1.55x", "0.330"]
    strict = Thresholds(max_ppl_increase=0.05, max_downstream_drop=0.01, min_speedup=2.0, max_memory_ratio=0.25)
    assert [c.passed for c in EvalResult(good, ref).checklist(strict)] == [False, False, False, False]
    assert [c.why for c in checks] == ["", "", "", ""]  # a pass needs no reason
    bad = stats("q", perplexity=11.5, decode_tokens_per_s=20.0, memory_bytes=150)
    result = EvalResult(bad, ref, downstream_skipped="lm-eval is not installed (pip install lm-eval)")
    assert [c.verdict for c in result.checklist()] == ["FAIL", "n/a", "FAIL", "FAIL"]
    assert "lm-eval is not installed" in result.to_markdown()


def test_every_miss_of_the_checklist_says_why_in_one_line():
    """The thresholds stay; a FAIL or n/a names its cause: the data a check needs, what stays in full precision, the
    numbers behind a miss, a busy machine."""
    ref = stats("ref", perplexity=10.0, decode_tokens_per_s=20.0, memory_bytes=300 * MB, downstream={"a": 0.6})
    bad = stats(
        "q",
        perplexity=11.5,
        decode_tokens_per_s=22.0,
        memory_bytes=150 * MB,
        downstream={"a": 0.5},
        full_precision={"embedding": 56 * MB, "lm_head": 56 * MB},
        full_precision_dtype="bfloat16",
        busy_cores=1.6,
    )
    ppl, drop, speed, memory = (c.why for c in EvalResult(bad, ref).checklist())
    assert ppl.startswith("perplexity 11.50 against 10.00: ") and "calibration data" in ppl
    assert drop == "largest drop on a: 60.0 % -> 50.0 %"
    assert speed.startswith("decode 22.0 against 20.0 tokens/s; other processes used 1.6 CPU cores")
    assert memory == "embedding and lm_head stay bfloat16 (112.0 of 150.0 MiB): try embeddings='int8'"
    tied = stats("q", memory_bytes=150 * MB, full_precision={"embedding and lm_head (tied)": 56 * MB})
    assert EvalResult(tied, ref).checklist()[3].why.startswith("embedding and lm_head (tied) stay full precision")
    layers = stats(
        "q", memory_bytes=150 * MB, full_precision={"3 other layers": 9 * MB}, full_precision_dtype="float32"
    )
    assert EvalResult(layers, ref).checklist()[3].why == "3 other layers stay float32 (9.0 of 150.0 MiB)"
    assert "fewer bits" in EvalResult(stats("q", memory_bytes=150 * MB), ref).checklist()[3].why
    # n/a: what it needs
    offline = "offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set): lm-eval needs to download task data"
    quiet = stats("q", perplexity=10.5, memory_bytes=90 * MB)
    checks = EvalResult(quiet, ref, downstream_skipped=offline).checklist()
    assert [c.verdict for c in checks] == ["PASS", "n/a", "n/a", "PASS"]
    assert [c.why for c in checks] == ["", "needs downstream data: offline", "speed not measured (speed=False)", ""]
    assert EvalResult(quiet, ref).checklist()[1].why.startswith("needs downstream data: no tasks given")
    alone = EvalResult(quiet).checklist()
    assert {c.why for c in alone} == {"needs a reference model (the unquantized one) to compare with"}
    markdown = EvalResult(quiet, ref, downstream_skipped=offline).to_markdown()
    assert "| downstream accuracy drop | — | < 2 points | n/a | needs downstream data: offline |" in markdown


def test_full_precision_weights_name_what_a_quantized_model_keeps_whole(quantized, tiny):
    parts, dtype = full_precision_weights(quantized)  # tiny Llama, tied embeddings: the one float weight left
    embedding = quantized.get_input_embeddings().weight
    assert parts == {"embedding and lm_head (tied)": embedding.numel() * 2} and dtype == "bfloat16"
    kept = hf_ptq.PtqConfig(method="rtn", bits=4, group_size=32, modules_to_not_convert=["down_proj"])
    model = hf_ptq.quantize(FAMILIES["llama"].build(), kept)  # untied lm_head
    parts, _ = full_precision_weights(model)
    assert sorted(parts) == ["2 other layers", "embedding", "lm_head"]
    assert parts["2 other layers"] == 2 * model.model.layers[0].mlp.down_proj.weight.numel() * 2
    assert full_precision_weights(tiny[0])[0]["embedding and lm_head (tied)"] == embedding.numel() * 2
    assert "14 other layers" in full_precision_weights(tiny[0])[0]  # the float model: every Linear


def test_result_round_trips_through_json_and_headline():
    ref = stats("ref", perplexity=10.0, checkpoint_bytes=400)
    result = EvalResult(
        stats("q", perplexity=11.0, checkpoint_bytes=100), ref, kl_divergence=0.1234, top1_agreement=0.9
    )
    again = EvalResult.from_dict(result.to_dict())
    assert again == result and again.compression_ratio == 4.0
    assert result.headline() == {
        "perplexity": "11.000",
        "perplexity of the unquantized model": "10.000",
        "KL divergence from the unquantized model (nats/token)": "0.1234",
        "top-1 agreement with the unquantized model": "90.0%",
    }


def test_peak_memory_sees_a_short_lived_allocation():
    with PeakMemory() as peak:
        block = torch.ones(2**24)  # 64 MiB, touched
        time.sleep(0.1)
        del block
    assert peak.bytes >= 48 * 2**20


def test_downstream_tasks_skip_cleanly(tiny, monkeypatch):
    model, tok = tiny
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed: find_spec gives None
    assert run_tasks(model, tok, ["hellaswag"]) == ({}, "lm-eval is not installed (pip install lm-eval)")
    result = hf_ptq.evaluate(model, tok, reference=model, data=TEXT, max_length=32, speed=False, tasks=["hellaswag"])
    assert result.downstream == {} and result.downstream_skipped.startswith("lm-eval is not installed")
    assert result.checklist()[1].passed is None
    assert result.checklist()[1].why == "needs downstream data: lm-eval is not installed (pip install lm-eval)"


def fake_lm_eval(results: dict | None = None, error: Exception | None = None) -> types.ModuleType:
    """A stand-in for the lm_eval package: records the HFLM it is given, returns `results` or raises `error`."""
    module = types.ModuleType("lm_eval")
    module.__spec__ = importlib.machinery.ModuleSpec("lm_eval", None)
    models = types.ModuleType("lm_eval.models")
    huggingface = types.ModuleType("lm_eval.models.huggingface")

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            self.pretrained, self.tokenizer = pretrained, tokenizer

    def simple_evaluate(model, tasks, limit):
        module.calls.append((model.pretrained, tuple(tasks), limit))
        if error is not None:
            raise error
        return {"results": results}

    huggingface.HFLM, module.simple_evaluate, module.calls = HFLM, simple_evaluate, []
    return module, {"lm_eval": module, "lm_eval.models": models, "lm_eval.models.huggingface": huggingface}


def test_downstream_tasks_through_lm_eval(tiny, quantized, monkeypatch):
    model, tok = tiny
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module, mods = fake_lm_eval({"arc_easy": {"acc,none": 0.5, "acc_norm,none": 0.55}})
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    assert run_tasks(model, tok, ["arc_easy"])[1].startswith("offline")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert run_tasks(model, tok, ["arc_easy"], limit=5) == ({"arc_easy": 0.55}, None)
    assert module.calls == [(model, ("arc_easy",), 5)]
    module, mods = fake_lm_eval(error=ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub"))
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    scores, why = run_tasks(model, tok, ["arc_easy"])
    assert scores == {} and why == "lm-eval failed (ConnectionError: Couldn't reach 'allenai/ai2_arc' on the Hub)"
