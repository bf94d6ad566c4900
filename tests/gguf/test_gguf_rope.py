"""Llama 3 rotary scaling recovered from llama.cpp's rope_freqs table."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf_files import llama3_divisors

from edgeserve.arch.rope import inv_freq
from edgeserve.arch.spec import RopeSpec
from edgeserve.gguf import GGUFError, GGUFFile
from edgeserve.gguf.rope import llama3_scaling

LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def metadata_file(path, context: int = 131072) -> GGUFFile:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_rope_freq_base(500000.0)
    w.add_context_length(context)
    w.add_tensor("rope_freqs.weight", np.ones(64, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GGUFFile(path)


def spec(p: dict) -> RopeSpec:
    return RopeSpec(500000.0, "llama3", p["factor"], p["low_freq_factor"],
                    p["high_freq_factor"], p["original_max_position_embeddings"])


@pytest.mark.parametrize("params", [LLAMA31, LLAMA31 | {"factor": 32.0, "high_freq_factor": 2.0}])
def test_llama3_parameters_give_the_same_frequencies(params, tmp_path):
    table = torch.from_numpy(llama3_divisors(params, 128, 500000.0))
    assert 1.0 < float(table[33]) < params["factor"]        # the blended band is not empty
    found = llama3_scaling(metadata_file(tmp_path / "m.gguf"), table, 128)
    torch.testing.assert_close(inv_freq(spec(found), 128), inv_freq(spec(params), 128),
                               rtol=1e-5, atol=0)


def test_a_table_of_another_form_is_refused(tmp_path):
    table = torch.linspace(1.0, 8.0, 64)                     # no constant short band
    with pytest.raises(GGUFError, match="not a Llama 3 rotary scaling table"):
        llama3_scaling(metadata_file(tmp_path / "m.gguf"), table.flip(0), 128)
