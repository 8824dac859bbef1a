"""The record beside a prebuilt tsgb_ext._C (benchmarks/device_prebuild.sh writes it,
benchmarks/gpu_check.sh checks it before it trusts the file).

    python benchmarks/prebuilt_info.py hash          # the source hash, printed (before a build)
    python benchmarks/prebuilt_info.py write DIR H   # after a build from sources of hash H
    python benchmarks/prebuilt_info.py check DIR     # exit 0: usable here; 3: not (says why)
    python benchmarks/prebuilt_info.py so DIR        # print the .so's path for this Python

The record holds the torch git_version and version the file was built against, the Python's
extension suffix, and a hash of the C++/CUDA sources and setup.py. `check` compares all three
with this machine's torch, Python and checkout: a file built against another torch build
may import and then misbehave, and one built from other sources tests other code.
"""
from __future__ import annotations

import hashlib
import os
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC_EXT = (".cpp", ".h", ".cu", ".cuh")
INFO = "build_info.txt"


def src_hash(root: str = ROOT) -> str:
    """sha256 over the paths and contents of csrc/**/*.{cpp,h,cu,cuh} and setup.py."""
    h = hashlib.sha256()
    files = []
    for d, _, names in os.walk(os.path.join(root, "csrc")):
        files += [os.path.join(d, n) for n in names if n.endswith(SRC_EXT)]
    files = sorted(os.path.relpath(f, root) for f in files) + ["setup.py"]
    for rel in files:
        h.update(rel.encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as f:
            h.update(f.read() + b"\0")
    return h.hexdigest()[:16]


def so_name() -> str:
    return "_C" + sysconfig.get_config_var("EXT_SUFFIX")


def current() -> dict:
    import torch
    return {"torch_git_version": torch.version.git_version, "torch_version": torch.__version__,
            "torch_cuda": str(torch.version.cuda), "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
            "python": sys.version.split()[0], "src_hash": src_hash()}


def read(path: str) -> dict:
    with open(path) as f:
        return dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)


def main(argv) -> int:
    if argv == ["hash"]:
        print(src_hash())
        return 0
    if not ((len(argv) == 2 and argv[0] in ("check", "so")) or (len(argv) == 3 and argv[0] == "write")):
        print(__doc__, file=sys.stderr)
        return 2
    cmd, d = argv[:2]
    info_path = os.path.join(d, INFO)
    if cmd == "so":
        print(os.path.join(d, "tsgb_ext", so_name()))
        return 0
    if cmd == "write":
        rec = current()
        if rec["src_hash"] != argv[2]:
            print(f"prebuilt: the sources changed during the build (hash {argv[2]} before, "
                  f"{rec['src_hash']} now): build again", file=sys.stderr)
            return 3
        with open(info_path, "w") as f:
            f.writelines(f"{k}={v}\n" for k, v in rec.items())
        return 0
    so = os.path.join(d, "tsgb_ext", so_name())
    if not os.path.isfile(so):
        print(f"prebuilt: no {so} (built for another Python? run benchmarks/device_prebuild.sh)")
        return 3
    if not os.path.isfile(info_path):
        print(f"prebuilt: no {info_path} beside the .so (run benchmarks/device_prebuild.sh)")
        return 3
    rec, now = read(info_path), current()
    print(f"prebuilt: {so}, built against torch {rec.get('torch_version')} "
          f"(git {rec.get('torch_git_version')}); here torch {now['torch_version']} "
          f"(git {now['torch_git_version']})")
    why = []
    if rec.get("torch_git_version") != now["torch_git_version"]:
        why.append(f"torch git_version {rec.get('torch_git_version')} (prebuild) != "
                   f"{now['torch_git_version']} (here)")
    if rec.get("ext_suffix") != now["ext_suffix"]:
        why.append(f"Python extension suffix {rec.get('ext_suffix')} != {now['ext_suffix']}")
    if rec.get("src_hash") != now["src_hash"]:
        why.append(f"C++/CUDA sources changed since the prebuild (hash {rec.get('src_hash')} "
                   f"!= {now['src_hash']}): rerun benchmarks/device_prebuild.sh")
    if why:
        print("prebuilt: NOT USABLE: " + "; ".join(why))
        return 3
    print("prebuilt: matches this torch, Python and checkout")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
