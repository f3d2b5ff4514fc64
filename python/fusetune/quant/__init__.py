"""4-bit weights: NF4 quantisation compatible with bitsandbytes."""
from fusetune.quant.nf4 import NF4State, dequantize_nf4, quantize_nf4, state_from_dict, state_to_dict

__all__ = ["NF4State", "dequantize_nf4", "quantize_nf4", "state_from_dict", "state_to_dict"]
