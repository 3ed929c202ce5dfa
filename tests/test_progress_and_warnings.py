"""Long steps show progress in tokens or runs; a repeated warning is said once and counted; known-misleading
transformers warnings can be silenced."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import FAMILIES, VOCAB

from hf_ptq.calibration.self_generated import sample_from_model
from hf_ptq.core.progress import TokenProgress
from hf_ptq.core.quiet import quiet_transformers_warnings
from hf_ptq.core.warn_once import repeated_warnings_reported, report_repeated_warnings, warn_once
from hf_ptq.evaluation import speed
from hf_ptq.methods.gptq import inverse_hessian_factor


class Bars:
    """Records every tqdm bar made through transformers' tqdm in the modules patched."""

    def __init__(self) -> None:
        self.made: list[dict] = []

    def __call__(self, *args, **kwargs):
        record = {"total": kwargs.get("total"), "desc": kwargs.get("desc"), "unit": kwargs.get("unit"), "n": 0}
        self.made.append(record)
        if args:  # tqdm(iterable): the loop itself
            return args[0]

        class Bar:
            def update(self, n: int = 1) -> None:
                record["n"] += n

            def set_postfix_str(self, text: str) -> None:
                record.setdefault("postfix", []).append(text)

            def __enter__(self):
                return self

            def __exit__(self, *exc) -> None:
                pass

            def close(self) -> None:
                pass

        return Bar()


@pytest.fixture
def bars(monkeypatch) -> Bars:
    import hf_ptq.calibration.self_generated as self_generated
    import hf_ptq.evaluation.data as data
    import hf_ptq.evaluation.run as run

    recorder = Bars()
    for module in (self_generated, data, run):
        monkeypatch.setattr(module, "tqdm", recorder)
    return recorder


def test_data_free_calibration_counts_the_tokens_it_samples(bars):
    model = FAMILIES["llama"].build()
    samples = sample_from_model(model, num_samples=5, seq_len=24, piece_len=8, parallel=4)
    assert len(samples) == 5 and all(s.shape == (24,) for s in samples)
    (bar,) = bars.made
    assert bar["unit"] == "token" and "sampling text from the model" in bar["desc"]
    assert bar["total"] == bar["n"] == 5 * 24  # 15 pieces of 8 tokens: every token counted once
    assert torch.equal(torch.stack(samples), torch.stack(sample_from_model(model, 5, 24, piece_len=8, parallel=4)))


def test_evaluation_text_and_speed_show_their_steps(bars, tiny_llama_with_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_ptq

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_with_tokenizer_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_with_tokenizer_dir)
    result = hf_ptq.evaluate(model, tokenizer, max_length=32, new_tokens=4, speed_repeats=2, max_windows=1)
    text, timing = (b for b in bars.made if b["desc"].startswith(("hf_ptq eval text", "hf_ptq speed")))
    assert text["unit"] == "token" and text["n"] == text["total"] == 4 * 96  # 4 prompts x 96 sampled tokens
    assert timing["unit"] == "run" and timing["n"] == timing["total"] == 2 * (1 + 2)  # warm-up + repeats, twice
    assert timing["postfix"] == ["prefill 32 tokens", "decode 4 tokens"]
    assert result.decode_tokens_per_s > 0 and result.model.busy_cores is not None


def test_best_seconds_steps_outside_the_timing():
    calls = []
    seconds = speed.best_seconds(lambda: calls.append("run"), repeats=3, warmup=2, step=lambda: calls.append("step"))
    assert calls == ["run", "step"] * 5 and seconds >= 0


def test_token_progress_never_stops_generation():
    counted = []

    class Bar:
        def update(self, n: int) -> None:
            counted.append(n)

    done = TokenProgress(Bar())(torch.zeros(3, 5, dtype=torch.long), None)
    assert done.dtype == torch.bool and not done.any() and counted == [3]
    model = FAMILIES["llama"].build()
    ids = torch.randint(3, VOCAB, (2, 4))
    out = model.generate(
        ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, stopping_criteria=[TokenProgress(Bar())]
    )
    assert out.shape == (2, 10) and sum(counted[1:]) == 2 * 6


def test_a_repeated_warning_is_said_once_and_counted_at_the_end(caplog):
    log = logging.getLogger("hf_ptq")
    with caplog.at_level(logging.WARNING, logger="hf_ptq"), repeated_warnings_reported():
        for _ in range(20):
            warn_once(log, "hf_ptq test: used %g instead.", 0.1)
        warn_once(log, "hf_ptq test: used %g instead.", 1.0)  # another message: said too
        assert [r.getMessage() for r in caplog.records] == [
            "hf_ptq test: used 0.1 instead.",
            "hf_ptq test: used 1 instead.",
        ]
    assert caplog.records[-1].getMessage() == "hf_ptq test: used 0.1 instead. (said 20 times)"
    assert len(caplog.records) == 3  # said once, not-repeated ones not reported again
    assert report_repeated_warnings() == {}  # the run's counts are gone
    with caplog.at_level(logging.WARNING, logger="hf_ptq"):
        warn_once(log, "hf_ptq test: used %g instead.", 0.1)
    assert len(caplog.records) == 4  # a new run says it again


def test_gptq_hessian_warning_is_said_once_per_run(caplog):
    h = torch.tensor([[1.25, 1.75], [1.75, 1.25]])  # not positive definite at damp 0.01
    with caplog.at_level(logging.WARNING, logger="hf_ptq"):
        for _ in range(5):
            inverse_hessian_factor(h, 0.01)
        assert sum("not positive definite" in r.getMessage() for r in caplog.records) == 1
        assert report_repeated_warnings() == {
            "hf_ptq gptq: the Hessian was not positive definite with damp_percent=0.01; used 1 instead.": 5
        }
    assert caplog.records[-1].getMessage().endswith("used 1 instead. (said 5 times)")


def test_quiet_transformers_warnings_drops_only_the_matching_records():
    """transformers' loggers do not propagate to the root: a handler on its library logger sees what users see."""
    from transformers.utils import logging as hf_logging

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    library = logging.getLogger("transformers")
    library.addHandler(handler)
    existing = hf_logging.get_logger("transformers.quantizers.quiet_test")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # conftest silences transformers below errors
    try:
        with quiet_transformers_warnings(r"fastest in float32") as dropped:
            existing.warning("Loading a GGUF checkpoint with its weights packed is fastest in float32, and ...")
            hf_logging.get_logger("transformers.quiet_test_made_later").warning("also fastest in float32")
            existing.warning("something else")
        existing.warning("fastest in float32, outside the block")
    finally:
        library.removeHandler(handler)
        hf_logging.set_verbosity(verbosity)
    assert dropped.dropped == 2
    assert seen == ["something else", "fastest in float32, outside the block"]
