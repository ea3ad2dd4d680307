"""The encoder model: the Encoder class, Hugging Face checkpoints, the architecture table that maps checkpoint
names onto the C core's layout, and medquant's own quantized save format.

Modules are imported directly (``from medquant.model.encoder import Encoder``); this package imports nothing so
that ``medquant.model`` and ``medquant.quant`` can refer to each other's modules without import cycles.
"""
