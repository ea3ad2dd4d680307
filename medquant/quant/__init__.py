"""Quantization: schemes (what precision every site runs in), calibration statistics, turning an fp32 encoder into a
quantized one under a scheme, and the per-site error report.

Modules are imported directly (``from medquant.quant.schemes import PRESETS``); this package imports nothing so
that ``medquant.model`` and ``medquant.quant`` can refer to each other's modules without import cycles.
"""
