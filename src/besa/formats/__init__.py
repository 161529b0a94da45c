"""How weights are stored: quantization codes (`quant`), the sparse bitmask format (`sparse`) and compressed-tensors
(`compressed`)."""
