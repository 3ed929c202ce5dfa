"""The numbers transformers users read off a model, and plan big loads with, are the float model's or the bytes
really held (issue 18): `num_parameters()` counts each quantized weight as the float weight it stands for,
`get_memory_footprint()` is the bytes of the tensors held, and the sizes `device_map="auto"` / `max_memory` / disk
offload plan with (`compute_module_sizes` with the quantizer, as `from_pretrained` calls it) are the bytes each
module holds once loaded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, VOCAB, input_ids, model_output
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from transformers.integrations import accelerate as hf_accelerate

import hf_ptq
from hf_ptq import PtqConfig, SmoothQuantConfig
from hf_ptq.nn import QuantLinear, TiedQuantHead, W8A8Linear
from hf_ptq.nn.quant_embedding import PackedRows

CALIBRATION = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(5))
CALIBRATED = dict(dataset=CALIBRATION, num_samples=4, seq_len=16, batch_size=4)
HQQ = pytest.mark.extra("hqq")

# case -> (the config, whether the float model ties its head to the input embedding)
CASES: dict[str, tuple[Callable[[], object], bool]] = {
    "rtn": (lambda: PtqConfig(method="rtn", bits=4, group_size=32, sym=False), False),
    "int8": (lambda: PtqConfig(method="int8"), False),
    "hqq": (lambda: PtqConfig(method="hqq", bits=4, group_size=32), False),
    "gptq-act-order": (lambda: PtqConfig(method="gptq", bits=4, group_size=32, desc_act=True, **CALIBRATED), False),
    "awq-embeddings-int8-tied": (
        lambda: PtqConfig(method="awq", bits=4, group_size=32, embeddings="int8", **CALIBRATED),
        True,
    ),
    "smoothquant-static": (lambda: SmoothQuantConfig(activations="static", **CALIBRATED), False),
    "rtn-embeddings-int8-tied": (lambda: PtqConfig(method="rtn", bits=4, group_size=32, embeddings="int8"), True),
    "rtn-embeddings-int4": (lambda: PtqConfig(method="rtn", bits=4, group_size=32, embeddings="int4"), False),
}
PACKED = (QuantLinear, W8A8Linear, PackedRows)


def case_params(names: list[str] | None = None) -> list:
    return [pytest.param(n, marks=HQQ) if n.startswith("hqq") else n for n in names or CASES]


class Loaded:
    """One case, computed once per module: the float model, the model quantized while loading it, the folder that
    model was saved to and the model reloaded from there."""

    def __init__(self, root: Path, name: str) -> None:
        make_config, tied = CASES[name]
        config = FAMILIES["llama"].make_config()
        config.tie_word_embeddings = tied
        torch.manual_seed(0)
        self.float_model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
        self.float_dir = root / f"{name}-float"
        self.float_model.save_pretrained(self.float_dir)
        self.on_load = AutoModelForCausalLM.from_pretrained(self.float_dir, quantization_config=make_config())
        self.saved = root / f"{name}-saved"
        self.on_load.save_pretrained(self.saved)
        self.reloaded = AutoModelForCausalLM.from_pretrained(self.saved)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> Callable[[str], Loaded]:
    cache: dict[str, Loaded] = {}
    root = tmp_path_factory.mktemp("hf-contract")

    def get(name: str) -> Loaded:
        if name not in cache:
            cache[name] = Loaded(root, name)
        return cache[name]

    return get


def quantized_weight_values(model: torch.nn.Module, float_model: torch.nn.Module) -> int:
    """Values of the float weights that `model` holds quantized (from the float model; a tied matrix once)."""
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, (*PACKED, TiedQuantHead)):
            weight = float_model.get_submodule(name).weight
            weights[id(weight)] = weight.numel()
    return sum(weights.values())


def tensor_bytes(tensors) -> int:
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers `module` holds (each tensor once)."""
    return tensor_bytes([*module.parameters(), *module.buffers()])


def checkpoint_bytes(folder: Path) -> int:
    """Bytes of the tensors in the safetensors files of `folder`."""
    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            total += sum(tensor_bytes([f.get_tensor(k)]) for k in f.keys())
    return total


# --- num_parameters ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", case_params())
def test_num_parameters_are_the_float_models(name: str, loaded) -> None:
    """On load (after calibration for the calibrated methods) and after a save and reload: the float model's count,
    with and without embeddings; the quantized weights are frozen, so not trainable."""
    case = loaded(name)
    reference = case.float_model
    frozen = quantized_weight_values(case.on_load, reference)
    assert 0 < frozen < reference.num_parameters()
    for model in (case.on_load, case.reloaded):
        assert sum(p.numel() for p in model.parameters()) == reference.num_parameters() - frozen  # still buffers
        assert model.num_parameters() == reference.num_parameters()
        assert model.num_parameters(exclude_embeddings=True) == reference.num_parameters(exclude_embeddings=True)
        trainable = reference.num_parameters(only_trainable=True) - frozen
        assert model.num_parameters(only_trainable=True) == trainable


def test_num_parameters_of_hf_ptq_quantize_in_memory() -> None:
    """`hf_ptq.quantize` runs the same hooks: the same counts."""
    reference = FAMILIES["llama"].build()
    expected = (reference.num_parameters(), reference.num_parameters(exclude_embeddings=True))
    model = hf_ptq.quantize(FAMILIES["llama"].build(), PtqConfig(method="rtn", bits=4, group_size=32))
    assert (model.num_parameters(), model.num_parameters(exclude_embeddings=True)) == expected


def test_num_parameters_after_dequantize(loaded) -> None:
    """`model.dequantize()` leaves float Linears (and embeddings) holding Parameters: still the float counts."""
    case = loaded("rtn-embeddings-int8-tied")
    model = AutoModelForCausalLM.from_pretrained(case.saved)
    model.dequantize()
    assert not any(isinstance(m, PACKED) for m in model.modules())
    assert model.num_parameters() == case.float_model.num_parameters()
    assert model.num_parameters(only_trainable=True) == case.float_model.num_parameters(only_trainable=True)


@pytest.mark.extra("bnb")
def test_num_parameters_of_bitsandbytes_methods_stay_transformers(loaded) -> None:
    """The bitsandbytes methods run through the same after-hook: transformers' own count of their packed 4-bit
    parameters (doubled) still gives the float model's."""
    case = loaded("rtn")
    model = AutoModelForCausalLM.from_pretrained(case.float_dir, quantization_config=PtqConfig(method="nf4"))
    assert model.num_parameters() == case.float_model.num_parameters()
    assert model.num_parameters(exclude_embeddings=True) == case.float_model.num_parameters(exclude_embeddings=True)


def test_peft_counts_named_parameters_as_before(loaded) -> None:
    """peft's own counts stay those of `named_parameters`; `num_parameters` adds the adapter to the float count."""
    from optional_extras import require_extra

    peft = require_extra("finetune", "peft")
    case = loaded("rtn")
    model = AutoModelForCausalLM.from_pretrained(case.float_dir, quantization_config=CASES["rtn"][0]())
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["lm_head"]))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable > 0
    assert peft_model.get_nb_trainable_parameters() == (trainable, sum(p.numel() for p in peft_model.parameters()))
    assert peft_model.num_parameters() == case.float_model.num_parameters() + trainable
    assert peft_model.num_parameters(only_trainable=True) == trainable


# --- get_memory_footprint ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", case_params())
def test_memory_footprint_is_the_bytes_held(name: str, loaded) -> None:
    """Every parameter and buffer once; without buffers, the quantized weights' tensors still count (they are the
    weights): then it is the bytes the checkpoint holds, and less than the float model's."""
    case = loaded(name)
    for model, folder in ((case.on_load, case.saved), (case.reloaded, case.saved)):
        assert model.get_memory_footprint() == module_bytes(model)
        outside = [
            b for n, b in model.named_buffers() if not isinstance(model.get_submodule(n.rpartition(".")[0]), PACKED)
        ]
        without_buffers = model.get_memory_footprint(return_buffers=False)
        assert without_buffers == module_bytes(model) - tensor_bytes(outside)
        assert without_buffers == checkpoint_bytes(folder)
        assert without_buffers < case.float_model.get_memory_footprint(return_buffers=False)


# --- the sizes device_map / max_memory / disk offload plan with ----------------------------------------------
def planned_sizes(monkeypatch, folder: Path, **kwargs) -> tuple[dict[str, float], torch.nn.Module]:
    """The module sizes `from_pretrained(folder, device_map="auto", **kwargs)` plans with (transformers'
    `compute_module_sizes`, with the quantizer, recorded as it is called), and the loaded model."""
    recorded: list[dict[str, float]] = []
    compute = hf_accelerate.compute_module_sizes

    def record(model, hf_quantizer=None, buffers_only=False, only_modules=True):
        sizes = compute(model, hf_quantizer, buffers_only, only_modules)
        if not buffers_only:
            assert hf_quantizer is not None
            recorded.append(dict(sizes[0]))
        return sizes

    monkeypatch.setattr(hf_accelerate, "compute_module_sizes", record)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="auto", **kwargs)
    monkeypatch.undo()
    assert recorded
    return recorded[0], model


PLANNED = [
    ("rtn", True),
    ("int8", True),
    ("hqq", True),
    ("rtn-embeddings-int4", True),
    ("rtn-embeddings-int8-tied", True),
]
PLANNED += [("rtn", False), ("gptq-act-order", False), ("hqq", False), ("smoothquant-static", False)]


@pytest.mark.parametrize(
    "name, on_load",
    [pytest.param(n, o, marks=HQQ) if n == "hqq" else (n, o) for n, o in PLANNED],
    ids=[f"{n}-{'on-load' if o else 'reload'}" for n, o in PLANNED],
)
def test_planned_sizes_are_the_loaded_bytes(name: str, on_load: bool, loaded, monkeypatch) -> None:
    """Quantizing a float checkpoint on load, and reloading a saved one: each module is planned at the bytes it
    holds once loaded (packed codes, scales, zero points, shape, g_idx; W8A8's int8 weight), the model too."""
    case = loaded(name)
    if on_load:
        sizes, model = planned_sizes(monkeypatch, case.float_dir, quantization_config=CASES[name][0]())
    else:
        sizes, model = planned_sizes(monkeypatch, case.saved)
    modules = dict(model.named_modules())
    quantized = [n for n, m in modules.items() if isinstance(m, PACKED)]
    assert quantized
    for module_name in [n for n in sizes if n in modules]:
        assert sizes[module_name] == module_bytes(modules[module_name]), module_name
    q_proj = "model.layers.0.self_attn.q_proj"
    assert sizes[q_proj] < case.float_model.get_submodule(q_proj).weight.numel() * 2  # the bf16 weight's bytes


@pytest.mark.parametrize("name", case_params(["rtn", "int8", "hqq"]))
def test_max_memory_offloads_to_disk_what_real_sizes_predict(name: str, loaded, tmp_path: Path) -> None:
    """A CPU budget that holds the embedding and the first block only at their quantized sizes: quantizing on load
    places the modules as transformers' planner places them from the real sizes of the quantized model, some on
    disk, and the offloaded model computes the same logits."""
    case = loaded(name)
    reference = case.on_load  # all on the CPU
    sizes, _ = hf_accelerate.compute_module_sizes(reference)  # real bytes, no quantizer
    block = sizes["model.layers.0"]  # the planner keeps room for the largest block beside what it places
    max_memory = {"cpu": sizes["model.embed_tokens"] + block + block + 64}
    no_split = reference._no_split_modules
    predicted = hf_accelerate.infer_auto_device_map(reference, max_memory=max_memory, no_split_module_classes=no_split)
    assert predicted["model.layers.0"] == "cpu" and predicted["model.layers.1"] == "disk"

    offloaded = AutoModelForCausalLM.from_pretrained(
        case.float_dir,
        quantization_config=CASES[name][0](),
        device_map="auto",
        max_memory=max_memory,
        offload_folder=str(tmp_path / "offload"),
    )
    assert offloaded.hf_device_map == dict(predicted)
    on_disk = [n for n, d in offloaded.hf_device_map.items() if d == "disk"]
    assert len(on_disk) == sum(d == "disk" for d in predicted.values())
    ids = input_ids()
    torch.testing.assert_close(model_output(offloaded, ids), model_output(reference, ids), rtol=0, atol=0)
