"""Embeddings of every preset, bit for bit, against values recorded with the code before a change.

Refactoring must not change a single bit of what a scheme computes. This test quantizes the packaged
all-MiniLM-L6-v2 under every preset (static schemes calibrated on fixed texts), encodes fixed texts (CLS and mean
pooling, normalized and not) and compares with ``tests/data/embeddings/<machine>.npz``, recorded by
``python tests/test_bit_identical.py --record``.

oneDNN picks kernels by CPU, so float results differ between CPUs: a reference holds for the machine key it was
recorded under (effective ISA, whether int8 is exact and bf16 native, oneDNN version, thread count, CPU model and
cache size). On a
machine with a recorded key the comparison is exact; on another one it is a tolerance check against the closest
recorded key (same int8/bf16 paths if there is one), which still catches a scheme that computes something else.
``.ci/isa.sh`` reruns this file under ``ONEDNN_MAX_CPU_ISA`` caps, whose keys are recorded too.
"""
from __future__ import annotations

import argparse
import platform
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import medquant
from medquant.model.checkpoint import resolve_model_path
from medquant.quant.schemes import PRESETS

REF_DIR = Path(__file__).parent / "data" / "embeddings"
N_THREADS = 2

# Written for this test (not taken from any dataset): short questions, a long passage, odd tokens.
TEXTS = [
    "What are the symptoms of glaucoma?",
    "How is type 2 diabetes treated in older adults?",
    "Who is at risk for iron-deficiency anemia, and can it be prevented?",
    "High blood pressure (hypertension) often has no symptoms. Over time it damages the arteries, the heart, the "
    "kidneys and the eyes; regular measurement, less salt, physical activity and, where needed, medication such "
    "as ACE inhibitors or thiazide diuretics lower the risk of stroke and heart attack.",
    "Is cystic fibrosis inherited?",
    "BRCA1/BRCA2 mutation carriers: screening interval for breast MRI (age 25-29)?",
]
CALIBRATION = TEXTS + [
    "What causes chronic kidney disease?",
    "Treatment options for early-stage prostate cancer include surgery, radiation and active surveillance.",
    "Can asthma in children be outgrown?",
    "Side effects of long-term corticosteroid use include osteoporosis, weight gain and high blood sugar.",
]
# (pooling, normalize) combinations encoded for every preset
VARIANTS = [("mean", True), ("cls", False)]


def machine_key() -> str:
    info = medquant.runtime_info()
    model, cache = platform.processor() or "unknown-cpu", "?"
    try:  # oneDNN's blocking depends on cache sizes, so CPUs that share a model name may still differ
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1]
            elif line.startswith("cache size"):
                cache = line.split(":", 1)[1]
                break
    except OSError:
        pass
    model = re.sub(r"[^A-Za-z0-9]+", "-", f"{model} {cache}").strip("-").lower()
    return (f"{info['cpu_isa']}_int8{'exact' if info['int8_exact'] else 'emul'}"
            f"_bf16{'native' if info['bf16_native'] else 'emul'}_onednn{info['onednn_version']}"
            f"_t{N_THREADS}_{model}")


def compute() -> dict:
    """{f"{preset}/{pooling}/{normalize}": embeddings} for every preset and variant."""
    base = medquant.Encoder.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"), n_threads=N_THREADS)
    out = {}
    for name, scheme in PRESETS.items():
        enc = base.quantize(name, calibration_texts=CALIBRATION if scheme.needs_calibration else None, show_progress_bar=False)
        for pooling, normalize in VARIANTS:
            out[f"{name}/{pooling}/{int(normalize)}"] = enc.encode(TEXTS, batch_size=4, pooling=pooling,
                                                                   normalize=normalize, show_progress_bar=False)
    return out


def load_references() -> dict:
    return {p.stem: dict(np.load(p)) for p in sorted(REF_DIR.glob("*.npz"))}


def closest_reference(key: str, refs: dict) -> str:
    """The recorded key sharing the int8/bf16 paths with this machine, preferring the same ISA."""
    paths = key.split("_")[1:3]
    same_paths = [k for k in refs if k.split("_")[1:3] == paths]
    candidates = same_paths or list(refs)
    same_isa = [k for k in candidates if k.split("_")[0] == key.split("_")[0]]
    return (same_isa or candidates)[0]


@pytest.fixture(scope="module")
def current():
    return compute()


def test_reference_covers_every_preset_and_variant():
    refs = load_references()
    assert refs, f"no recorded embeddings in {REF_DIR}"
    expected = {f"{n}/{p}/{int(z)}" for n in PRESETS for p, z in VARIANTS}
    for key, ref in refs.items():
        assert set(ref) == expected, f"{key}: recorded presets differ from PRESETS; re-record before a change"


def test_embeddings_bit_identical_to_recorded(current):
    refs = load_references()
    key = machine_key()
    exact = key in refs
    ref_key = key if exact else closest_reference(key, refs)
    ref = refs[ref_key]
    same_int8_path = key.split("_")[1] == ref_key.split("_")[1]
    for name, emb in current.items():
        want = ref[name]
        assert emb.shape == want.shape and emb.dtype == want.dtype, name
        if exact:
            diff = np.flatnonzero(emb.view(np.uint32) != want.view(np.uint32))
            assert diff.size == 0, (f"{name}: {diff.size} of {emb.size} values changed on {key}, max abs diff "
                                    f"{np.abs(emb - want).max():.3g}")
        else:
            # statically calibrated ranges move with the float rounding of the calibration pass (measured: cosine
            # 0.994-0.996 between ISAs on these texts), and so do dynamic activation grids between exact and
            # emulated int8 (measured: per-token 0.997 on AVX-512 VNNI against AVX2, both 0.996-0.998 to fp32);
            # everything else stays above 0.9999
            scheme = PRESETS[name.split("/")[0]]
            int8_acts = scheme.activations == "int8"
            floor = 0.99 if scheme.needs_calibration or (int8_acts and not same_int8_path) else 0.9995
            cos = np.sum(emb * want, 1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(want, axis=1))
            assert cos.min() > floor, f"{name}: cosine to the recorded embeddings {cos.min():.6f} (no exact key {key})"


def test_quantized_embeddings_survive_save_and_load(current, tmp_path):
    """What a preset computes is what its saved directory computes after loading, bit for bit."""
    base = medquant.Encoder.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"), n_threads=N_THREADS)
    for name in ("int8-static-asym", "int8-smoothquant", "w4-weight-only", "bf16"):
        enc = base.quantize(name, calibration_texts=CALIBRATION, show_progress_bar=False)
        enc.save_pretrained(tmp_path / name)
        loaded = medquant.Encoder.from_pretrained(tmp_path / name, n_threads=N_THREADS)
        for pooling, normalize in VARIANTS:
            got = loaded.encode(TEXTS, batch_size=4, pooling=pooling, normalize=normalize, show_progress_bar=False)
            np.testing.assert_array_equal(got, current[f"{name}/{pooling}/{int(normalize)}"], err_msg=name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--record", action="store_true", help="write this machine's reference (before a change)")
    args = ap.parse_args(argv)
    key = machine_key()
    if not args.record:
        print(key)
        return 0
    REF_DIR.mkdir(parents=True, exist_ok=True)
    path = REF_DIR / f"{key}.npz"
    np.savez_compressed(path, **compute())
    print(f"recorded {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
