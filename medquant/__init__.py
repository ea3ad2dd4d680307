"""medquant: BERT encoders quantized and run on CPU by a C core on oneDNN, and what quantization costs in
healthcare retrieval quality.

    import medquant
    enc = medquant.Encoder.from_pretrained("all-MiniLM-L6-v2")
    q = enc.quantize("int8-static-asym", calibration_texts=texts[:256])
    emb = q.encode(texts)
"""
from ._native import LIBDNNL_PATH, _core
from .eval.evaluate import EvalConfig, evaluate
from .eval.objective import ObjectiveResult, RetrievalObjective
from .model.checkpoint import DEFAULT_MODEL, CheckpointError
from .model.encoder import Encoder
from .quant.calibration import Calibration
from .quant.params import QuantParams, load_quant_params
from .quant.schemes import PRESETS, QuantScheme, get_scheme
from .quant.autoquant import AutoQuantConfig, autoquantize
from .quant.sensitivity import sensitivity

__version__ = "0.1.0"


def runtime_info() -> dict:
    """oneDNN version and build hash, threading runtime, effective CPU ISA, OpenMP thread count, library path, and
    which kernels this CPU offers: ``int8_exact`` (oneDNN's int8 matmul is exact here: VNNI or AMX) and
    ``bf16_native`` (a bf16 matmul exists here). Where one is False, layers of that precision are emulated: the same
    numbers, computed by an f32 matmul, at f32 speed (see README, "Any CPU")."""
    info = dict(_core.runtime_info())
    info.update(_core.kernel_support())
    info["libdnnl"] = LIBDNNL_PATH
    info["medquant_version"] = __version__
    return info


__all__ = [
    "AutoQuantConfig", "Calibration", "CheckpointError", "DEFAULT_MODEL", "Encoder", "EvalConfig", "ObjectiveResult",
    "PRESETS", "QuantParams", "QuantScheme", "RetrievalObjective", "autoquantize", "evaluate", "get_scheme",
    "load_quant_params", "runtime_info",
    "sensitivity",
]
