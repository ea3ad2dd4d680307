"""Would a newer oneDNN from PyPI make medquant's int8 matmuls faster? One benchmark, two builds, alternating.

    python benchmarks/onednn_versions.py [--rounds 3] [--workdir DIR] [--out benchmarks/results]

medquant builds on `onednn-devel-cpu-gomp==2023.2.0` (oneDNN 3.2, GNU OpenMP; README "oneDNN from PyPI"). The
newest `onednn`/`onednn-devel` wheels (2026.1.0: oneDNN 3.13) are SYCL builds. This script
1. installs them into a venv of their own under --workdir (default ~/.cache/medquant-bench/onednn-versions) and
   records what they pulled in (packages, installed MiB);
2. makes their CPU device usable: the runtime they pull (`intel-cmplr-lib-ur` 2026.2.0) ships no OpenCL adapter, so
   the SYCL CPU device is not found ("SYCL cpu devices queried but not found"); the adapter library alone is taken
   from `intel-cmplr-lib-ur==2026.1.2` (same adapter ABI, 0.12) into --workdir, never into the venv or this
   repository, and the ICD loader is pointed at the venv's `libintelocl.so`;
3. builds benchmarks/onednn_versions.c against each release (rpath to its own libdnnl; -Wall -Wextra -Werror) and
   runs the two binaries alternately, --rounds times each, 2 threads;
4. writes benchmarks/results/<machine>/onednn_versions.{md,json}: per case the best and median TOP/s of each
   release, their ratio, the implementations, and whether the outputs' checksums agree.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import THREADS, machine_info  # noqa: E402

NEW_ONEDNN = "2026.1.0"
UR_WITH_OPENCL = "2026.1.2"


def sh(cmd, **kw) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def dir_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


def new_release(work: Path) -> dict:
    """The venv with the newer wheels (created once) and the OpenCL adapter beside it."""
    venv, info_file = work / "venv", work / "venv-info.json"
    if not info_file.exists():  # written last: an interrupted install is redone
        sh([sys.executable, "-m", "venv", "--clear", str(venv)])
        before = dir_mib(venv)
        sh([str(venv / "bin" / "pip"), "install", "-q", f"onednn-devel=={NEW_ONEDNN}", f"onednn=={NEW_ONEDNN}"])
        pkgs = json.loads(sh([str(venv / "bin" / "pip"), "list", "--format", "json"]))
        info_file.write_text(json.dumps({"mib_before": before, "mib_after": dir_mib(venv), "packages": pkgs}))
    adapter = work / "ur_opencl"
    if not any(adapter.glob("libur_adapter_opencl.so*")):
        dl = work / "dl"
        sh([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dl),
            f"intel-cmplr-lib-ur=={UR_WITH_OPENCL}"])
        adapter.mkdir(exist_ok=True)
        for whl in dl.glob("intel_cmplr_lib_ur-*.whl"):
            with zipfile.ZipFile(whl) as z:
                for name in z.namelist():
                    if Path(name).name.startswith("libur_adapter_opencl.so"):
                        (adapter / Path(name).name).write_bytes(z.read(name))
    env = {"LD_LIBRARY_PATH": f"{adapter}:{venv / 'lib'}", "OCL_ICD_FILENAMES": str(venv / "lib" / "libintelocl.so")}
    return {"prefix": venv, "env": env, **json.loads(info_file.read_text())}


def build(prefix: Path, out: Path) -> None:
    inc = prefix / "include"
    sh(["cc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{inc}", str(HERE / "onednn_versions.c"),
        f"-L{prefix / 'lib'}", "-ldnnl", f"-Wl,--disable-new-dtags,-rpath,{prefix / 'lib'}", "-o", str(out)])


def parse(text: str) -> dict:
    out = {"header": [line for line in text.splitlines() if not line.startswith("RESULT")], "cases": {}}
    for line in text.splitlines():
        if line.startswith("RESULT"):
            kv = dict(x.split("=", 1) for x in line.split()[1:])
            out["cases"][f"{kv['M']}x{kv['K']}x{kv['N']} {kv['variant']}"] = kv
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get(
        "MEDQUANT_BENCH_CACHE", Path.home() / ".cache" / "medquant-bench")) / "onednn-versions")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    new = new_release(args.workdir)
    builds = {"3.2 (onednn-cpu-gomp 2023.2.0)": (Path(sys.prefix), {}),
              f"new (onednn {NEW_ONEDNN})": (new["prefix"], new["env"])}
    runs = {k: [] for k in builds}
    for i, (prefix, _) in enumerate(builds.values()):
        build(prefix, args.workdir / f"mm{i}")
    for r in range(args.rounds):
        for i, (name, (_, extra)) in enumerate(builds.items()):
            env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), **extra}
            runs[name].append(parse(sh([str(args.workdir / f"mm{i}")], env=env)))
            print(f"round {r + 1}: {name}: {runs[name][-1]['header'][0]}", flush=True)
    old, newk = list(builds)
    rows = []
    for case in runs[old][0]["cases"]:
        row = {"case": case}
        for k in builds:
            rs = [run["cases"][case] for run in runs[k]]
            row[k] = {"best_tops": max(float(x["best_TOPs"]) for x in rs),
                      "median_tops": statistics.median(float(x["med_TOPs"]) for x in rs),
                      "impl": sorted({x["impl"] for x in rs}), "checksums": sorted({x["cs"] for x in rs})}
        row["best_ratio"] = row[newk]["best_tops"] / row[old]["best_tops"]
        row["median_ratio"] = row[newk]["median_tops"] / row[old]["median_tops"]
        row["same_output"] = row[old]["checksums"] == row[newk]["checksums"]
        rows.append(row)

    mi = machine_info()
    res = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": mi, "rounds": args.rounds,
           "threads": THREADS, "headers": {k: runs[k][0]["header"] for k in builds},
           "new_venv": {k: new[k] for k in ("mib_before", "mib_after", "packages")}, "rows": rows,
           "geomean_best_ratio": statistics.geometric_mean(r["best_ratio"] for r in rows),
           "geomean_median_ratio": statistics.geometric_mean(r["median_ratio"] for r in rows)}
    L = [f"# oneDNN releases from PyPI on {mi['cpu_model']} ({res['date'][:10]})\n",
         f"`python benchmarks/onednn_versions.py --rounds {args.rounds}`; {THREADS} threads; the two builds "
         f"alternate. {old}: {runs[old][0]['header'][0]}; {newk}: {runs[newk][0]['header'][0]}, whose venv grew "
         f"from {new['mib_before']:.0f} to {new['mib_after']:.0f} MiB with: "
         + ", ".join(f"{p['name']} {p['version']}" for p in new["packages"] if p["name"] not in ("pip", "setuptools"))
         + ".\n",
         "| case (M x K x N) | TOP/s best, 3.2 / new | ratio | TOP/s median, 3.2 / new | ratio | implementations | "
         "same output |", "|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        a, b = r[old], r[newk]
        L.append(f"| {r['case']} | {a['best_tops']:.3f} / {b['best_tops']:.3f} | {r['best_ratio']:.2f} | "
                 f"{a['median_tops']:.3f} / {b['median_tops']:.3f} | {r['median_ratio']:.2f} | "
                 f"{', '.join(a['impl'])} / {', '.join(b['impl'])} | {'yes' if r['same_output'] else 'NO'} |")
    L.append(f"\nGeometric mean of new / 3.2: best {res['geomean_best_ratio']:.3f}, median "
             f"{res['geomean_median_ratio']:.3f}.\n")
    out_dir = args.out / mi["slug"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "onednn_versions.json").write_text(json.dumps(res, indent=1))
    (out_dir / "onednn_versions.md").write_text("\n".join(L))
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    sys.exit(main())
