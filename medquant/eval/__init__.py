"""Retrieval evaluation: datasets, exact and quantized-index search, trec_eval metrics, paired statistics, the
``evaluate`` study that compares quantization schemes, and its plots."""
