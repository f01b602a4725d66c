"""Weight-only quantization: the quantized weight type (qweight.py), activation-aware calibration
(awq.py) and the `smedjan quantize` stage (cli.py)."""
