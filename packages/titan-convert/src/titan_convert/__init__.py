"""titan-convert: titan DCP checkpoints <-> Hugging Face safetensors, for any installed model.

One generic driver over the ``state_dict_adapter`` of each installed model package's TrainSpec;
nothing here is specific to a model family.
"""

from titan_convert.dcp_to_hf import dcp_to_hf
from titan_convert.hf_to_dcp import hf_to_dcp

__all__ = ["dcp_to_hf", "hf_to_dcp"]
