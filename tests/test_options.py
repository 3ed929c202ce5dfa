"""One declaration per option: what each options dataclass declares is what `PtqConfig` / `SmoothQuantConfig`
accept, default, check and refuse, and a field added to a dataclass reaches the config with nothing else edited."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from hf_ptq import PtqConfig, SmoothQuantConfig, method_names
from hf_ptq.auto_method import AutoInputs
from hf_ptq.config import option_owners
from hf_ptq.core.bit_budget import MixedPrecisionOptions
from hf_ptq.core.options import InvalidOption, is_positive_int, option, option_field
from hf_ptq.core.scheme import WeightScheme
from hf_ptq.methods import METHODS, method_spec
from hf_ptq.methods.options import GPTQOptions, SequentialOptions

NOT_A_VALUE = object()  # fails every check


def declaration(method: str, name: str) -> dataclasses.Field:
    """Where option `name` of `method` is declared."""
    spec = method_spec(method)
    for cls in (spec.options, SequentialOptions, WeightScheme, AutoInputs, MixedPrecisionOptions):
        if cls is not None and name in {f.name for f in dataclasses.fields(cls)}:
            return option_field(cls, name)
    raise AssertionError(f"{name} is declared nowhere for {method}")


CASES = [(m, name) for name, users in option_owners().items() for m in users if m != "auto"]


@pytest.mark.parametrize(("method", "name"), CASES)
def test_an_accepted_option_defaults_and_checks_as_declared(method: str, name: str) -> None:
    field = declaration(method, name)
    sym = {"sym": True} if name == "full_range" and "sym" not in method_spec(method).forced_fields else {}
    assert getattr(PtqConfig(method=method, **sym), name) == field.default
    with pytest.raises(ValueError) as info:
        PtqConfig(method=method, **sym, **{name: NOT_A_VALUE})
    assert f"PtqConfig.{name}=" in str(info.value) and field.metadata["allowed"] in str(info.value)


@pytest.mark.parametrize("name", sorted(option_owners()))
def test_an_option_is_refused_by_every_method_that_does_not_read_it(name: str) -> None:
    users = option_owners()[name]
    for method in method_names():
        if method in users:
            continue
        with pytest.raises(ValueError, match=rf"PtqConfig\.{name}=.* does not apply to method='{method}'") as info:
            PtqConfig(method=method, **{name: option_field_default(name)})
        assert all(repr(u) in str(info.value) for u in users), (name, method)


def option_field_default(name: str):
    users = option_owners()[name]
    if users == ["auto"]:
        return {"finetune": True, "prefer": "latency", "deploy": "cpu"}[name]
    default = declaration(users[0], name).default
    if default is None:  # None means "not given": a value that is given
        return {"target_bits": 4.5, "layer_schemes": {"down_proj": {"bits": 8}}}[name]
    return default


def test_the_signature_names_every_option() -> None:
    keyword = {
        n for n, p in inspect.signature(PtqConfig).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    assert keyword == set(option_owners())
    smooth = inspect.signature(SmoothQuantConfig).parameters
    assert {"true_sequential", "damp_percent", "desc_act", "block_size", "clip"} <= set(smooth)


def test_a_field_added_to_a_methods_options_reaches_the_config(monkeypatch) -> None:
    """The one edit a new GPTQ option needs: a field in its dataclass (here a subclass standing for that edit)."""

    @dataclasses.dataclass(frozen=True)
    class WithPasses(GPTQOptions):
        passes: int = option(1, is_positive_int, "a positive integer", "how many passes")

    monkeypatch.setitem(METHODS, "gptq", dataclasses.replace(method_spec("gptq"), options=WithPasses))
    cfg = PtqConfig(method="gptq", passes=3)
    assert cfg.options == WithPasses(passes=3) and cfg.passes == 3
    assert PtqConfig(method="gptq").options.passes == 1
    assert PtqConfig.from_dict(cfg.to_dict()) == cfg  # saved flat, rebuilt from config.json
    with pytest.raises(ValueError, match=r"PtqConfig\.passes=0 is invalid: passes must be a positive integer"):
        PtqConfig(method="gptq", passes=0)
    with pytest.raises(ValueError, match=r"PtqConfig\.passes=3 does not apply to method='rtn'.*'gptq'"):
        PtqConfig(method="rtn", passes=3)


def test_options_objects_are_valid_by_construction() -> None:
    with pytest.raises(InvalidOption) as info:
        GPTQOptions(damp_percent=2.0)
    assert info.value.detail == "damp_percent=2.0 is invalid: damp_percent must be a number in (0, 1], e.g. 0.01."
    with pytest.raises(InvalidOption, match="full_range=True needs sym=True"):
        WeightScheme(4, 128, sym=False, full_range=True)
    assert PtqConfig(method="gptq", bits=3, group_size=64).scheme == WeightScheme(3, 64, False)
    assert SmoothQuantConfig(weight_method="gptq").options.gptq == GPTQOptions(clip=False)
