"""Promises about what hf_ptq loads: a damaged checkpoint, or one whose config disagrees with its tensors, fails
loudly before any weight is read, naming the module, the tensor, the file and the config field.

- every tensor a quantized module needs must come from the file (missing: error naming module, tensor, file);
- tensors the config rules out are an error naming the field (zero points with sym=True, g_idx without act-order,
  a static input scale with dynamic activations, packed tensors for a layer kept in full precision);
- shapes and dtypes follow from bits / group_size / the model's layer sizes;
- values: `weight_shape` is the layer's (out, in), scales and zero points are finite, act-order `weight_g_idx`
  lies in [0, groups) with every group of its size;
- files: safetensors only (no pickle), none truncated, the shard index consistent with the shards;
- the SHA-256 of every tensor is recorded at save and export and checked by `hf_ptq.verify` / `hf-ptq verify`
  and by `from_pretrained` (unless `HF_PTQ_VERIFY_CHECKSUMS=0`); a mismatch names the tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, assert_same_model, input_ids
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import hf_ptq
from hf_ptq.cli import main as cli_main
from hf_ptq.formats.checksums import METADATA_KEY, checksum_metadata
from hf_ptq.formats.save import saved_hf_ptq_config

LAYER = "model.layers.0.mlp.down_proj"


def _save(folder: Path, config, **save_kwargs) -> Path:
    """The tiny Llama quantized with `config` (quantize on load from a float save), saved to `folder`."""
    float_dir = folder.parent / f"{folder.name}-float"
    FAMILIES["llama"].build().save_pretrained(float_dir)
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=config)
    model.save_pretrained(folder, **save_kwargs)
    return folder


def _calibrated(config_cls=hf_ptq.PtqConfig, **fields):
    return config_cls(dataset=input_ids(4, 16).tolist(), num_samples=4, seq_len=16, **fields)


@pytest.fixture(scope="module")
def rtn_dir(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("rtn") / "q", hf_ptq.PtqConfig(method="rtn", bits=4, group_size=32))


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _rewrite(file: Path, edit, rehash: bool = True) -> None:
    """Rewrite a safetensors file with `edit(tensors)` applied; with `rehash` the checksums are recomputed, so
    that only the check under test can see the change."""
    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    edit(tensors)
    if rehash:
        metadata.update(checksum_metadata(tensors))
    save_file(tensors, str(file), metadata=metadata)


def _edit_config(folder: Path, **fields) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    saved_hf_ptq_config(config["quantization_config"]).update(fields)
    path.write_text(json.dumps(config))


def _load_error(folder: Path) -> str:
    """The CheckpointError of both `from_pretrained` and `hf_ptq.verify` (which must agree)."""
    with pytest.raises(hf_ptq.CheckpointError) as loaded:
        AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(hf_ptq.CheckpointError) as verified:
        hf_ptq.verify(folder)
    assert str(loaded.value) == str(verified.value)
    return str(loaded.value)


def test_sound_checkpoint_verifies_and_reloads_bit_identically(rtn_dir):
    report = hf_ptq.verify(rtn_dir)
    with safe_open(str(rtn_dir / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        digests = json.loads(f.metadata()[METADATA_KEY])
    assert set(digests) >= set(names)
    assert report.tensors == len(names) and report.checksums_checked == len(names) and not report.unverified
    reloaded = AutoModelForCausalLM.from_pretrained(rtn_dir)
    assert reloaded.hf_quantizer.verify_report.checksums_checked == len(names)
    assert_same_model(reloaded, AutoModelForCausalLM.from_pretrained(rtn_dir))


def test_missing_tensor_names_module_tensor_and_file(rtn_dir, tmp_path):
    folder = _copy(rtn_dir, tmp_path / "q")
    _rewrite(folder / "model.safetensors", lambda t: t.pop(f"{LAYER}.weight_zero_point"))
    message = _load_error(folder)
    assert f"{LAYER}.weight_zero_point: missing from model.safetensors" in message
    assert "sym=False" in message


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"sym": True}, f"{LAYER}.weight_zero_point in model.safetensors: not expected"),
        ({"sym": True}, "sym=True"),
        ({"bits": 8}, "the config says bits=8"),
        ({"group_size": 64}, "the config says group_size=64"),
        ({"modules_to_not_convert": ["down_proj"]}, "the config keeps it in full precision"),
    ],
)
def test_config_edited_to_disagree_names_the_field(rtn_dir, tmp_path, fields, expected):
    folder = _copy(rtn_dir, tmp_path / "q")
    _edit_config(folder, **fields)
    assert expected in _load_error(folder)


def test_act_order_checkpoint_needs_its_g_idx(tmp_path):
    folder = _save(tmp_path / "q", _calibrated(method="gptq", bits=4, group_size=32, desc_act=True))
    _edit_config(folder, desc_act=False)
    assert f"{LAYER}.weight_g_idx in model.safetensors: not expected" in _load_error(folder)
    _edit_config(folder, desc_act=True)
    g_idx = f"{LAYER}.weight_g_idx"

    def out_of_range(t):
        t[g_idx] = t[g_idx].clone()
        t[g_idx][0] = 99

    _rewrite(folder / "model.safetensors", out_of_range)
    assert "group indices must lie in [0, 4); found [0, 99]" in _load_error(folder)

    def uneven(t):
        t[g_idx] = torch.zeros_like(t[g_idx])

    _rewrite(folder / "model.safetensors", uneven)
    assert "act-order groups must have group_size=32 members each" in _load_error(folder)


def test_static_w8a8_needs_its_input_scale(tmp_path):
    folder = _save(tmp_path / "q", _calibrated(hf_ptq.SmoothQuantConfig, activations="static"))
    hf_ptq.verify(folder)
    _rewrite(folder / "model.safetensors", lambda t: t.pop(f"{LAYER}.input_scale"))
    message = _load_error(folder)
    assert f"{LAYER}.input_scale: missing" in message and "activations='static'" in message


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_scale_is_refused_naming_the_module(rtn_dir, tmp_path, value):
    folder = _copy(rtn_dir, tmp_path / "q")

    def poison(t):
        t[f"{LAYER}.weight_scale"] = t[f"{LAYER}.weight_scale"].clone()
        t[f"{LAYER}.weight_scale"][3, 1] = value

    _rewrite(folder / "model.safetensors", poison)
    assert f"{LAYER}.weight_scale in model.safetensors: 1 non-finite value(s)" in _load_error(folder)


def test_weight_shape_and_dtypes_are_checked(rtn_dir, tmp_path):
    folder = _copy(rtn_dir, tmp_path / "q")
    _rewrite(folder / "model.safetensors", lambda t: t.update({f"{LAYER}.weight_shape": torch.tensor([64, 64])}))
    message = _load_error(folder)
    assert f"{LAYER}.weight_shape in model.safetensors: holds [64, 64], but the layer is (out, in) = [64, 128]" in (
        message
    )
    packed = f"{LAYER}.weight_packed"
    _rewrite(folder / "model.safetensors", lambda t: t.update({packed: t[packed].to(torch.int64)}))
    assert f"{packed} in model.safetensors: dtype I64, expected int32" in _load_error(folder)


def test_flipped_bytes_are_caught_by_the_checksum(rtn_dir, tmp_path, monkeypatch):
    folder = _copy(rtn_dir, tmp_path / "q")
    file = folder / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        packed = f.get_tensor(f"{LAYER}.weight_packed").clone()  # not a view of the file, which is rewritten
    data = bytearray(file.read_bytes())
    at = data.find(packed.numpy().tobytes())  # the tensor's bytes inside the file
    assert at > 0
    data[at + 5] ^= 0x10
    file.write_bytes(bytes(data))
    message = _load_error(folder)
    assert "checksum mismatch" in message and f"{LAYER}.weight_packed in model.safetensors" in message
    # Opting out of the checksums (HF_PTQ_VERIFY_CHECKSUMS=0) loads the damaged weights: the layout is still right.
    monkeypatch.setenv("HF_PTQ_VERIFY_CHECKSUMS", "0")
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert not torch.equal(model.get_submodule(LAYER).weight_packed, packed)
    assert hf_ptq.verify(folder, checksums=False).checksums_checked == 0


def test_truncated_file_is_refused(rtn_dir, tmp_path):
    folder = _copy(rtn_dir, tmp_path / "q")
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    assert "damaged or truncated" in _load_error(folder)


def test_pickle_weights_are_never_loaded(rtn_dir, tmp_path):
    folder = _copy(rtn_dir, tmp_path / "q")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        torch.save({k: f.get_tensor(k) for k in f.keys()}, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    message = _load_error(folder)
    assert "safetensors only; refusing to load pytorch_model.bin" in message


def test_sharded_checkpoint_index_is_checked(tmp_path):
    folder = _save(tmp_path / "q", hf_ptq.PtqConfig(method="rtn", bits=4, group_size=32), max_shard_size="40KB")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert hf_ptq.verify(folder).files == shards
    wrong = next(s for s in shards if s != index["weight_map"][f"{LAYER}.weight_packed"])
    index["weight_map"][f"{LAYER}.weight_packed"] = wrong
    index_path.write_text(json.dumps(index))
    assert f"{LAYER}.weight_packed is listed in {wrong}, which does not hold it" in _load_error(folder)


def test_checksums_recorded_for_exports(rtn_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(rtn_dir)
    for fmt in ("compressed-tensors", "gptq"):
        out = hf_ptq.export(model, tmp_path / fmt, format=fmt)
        report = hf_ptq.verify(out)
        assert report.checksums_checked == report.tensors > 0, fmt


def test_cli_verify(rtn_dir, tmp_path, capsys):
    assert cli_main(["verify", str(rtn_dir)]) == 0
    assert "match the checksums recorded at save" in capsys.readouterr().out
    folder = _copy(rtn_dir, tmp_path / "q")
    _edit_config(folder, bits=8)
    assert cli_main(["verify", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "the config says bits=8" in err and "Traceback" not in err


def test_saves_are_byte_for_byte_reproducible(rtn_dir, tmp_path):
    """Two saves of one model give the same bytes (the safetensors library writes metadata keys in a random
    order; hf_ptq sorts them)."""
    model = AutoModelForCausalLM.from_pretrained(rtn_dir)
    for i in range(3):
        model.save_pretrained(tmp_path / f"again{i}")
        assert (tmp_path / f"again{i}" / "model.safetensors").read_bytes() == (
            rtn_dir / "model.safetensors"
        ).read_bytes()


@pytest.mark.extra("gguf")
def test_gguf_export_is_checked_for_truncation(tiny_llama_with_tokenizer_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_with_tokenizer_dir, quantization_config=hf_ptq.PtqConfig(group_size=32)
    )
    folder = hf_ptq.export(model, tmp_path / "gguf", format="gguf")
    report = hf_ptq.verify(folder)
    assert report.tensors > 0 and report.files == [p.name for p in folder.glob("*.gguf")]
    (path,) = folder.glob("*.gguf")
    path.write_bytes(path.read_bytes()[:-4096])
    with pytest.raises(hf_ptq.CheckpointError, match="truncated|not a readable GGUF"):
        hf_ptq.verify(folder)


def test_verify_refuses_newer_formats(rtn_dir, tmp_path):
    folder = _copy(rtn_dir, tmp_path / "q")
    _edit_config(folder, quant_method="hf_ptq_v9")
    with pytest.raises(hf_ptq.CheckpointError, match="'hf_ptq_v9' is not one this hf_ptq reads.*upgrade hf-ptq"):
        hf_ptq.verify(folder)
    _edit_config(folder, quant_method="hf_ptq", format_version=2)
    with pytest.raises(hf_ptq.CheckpointError, match="format_version=2.*upgrade hf-ptq"):
        hf_ptq.verify(folder)
    with pytest.raises(ValueError, match="format_version=2.*upgrade hf-ptq"):  # the config itself refuses it
        AutoModelForCausalLM.from_pretrained(folder)
