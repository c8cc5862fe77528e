"""Hashes of the tensors ziplora/duolora write for the bundled toy-world pair (``ohwx`` content, ``mrv``
style), in weight space and in model mode, to check a refactoring leaves the masks bit-identical:

    python benchmarks/mask_hashes.py OUT_DIR                 # writes OUT_DIR/hashes.json and prints it
    python benchmarks/mask_hashes.py OUT_DIR --compare benchmarks/mask_hashes.json

Each case is one CLI merge (one torch thread); the hash covers every tensor's name and bytes of the output
and of its masks sidecar.  The hashes depend on the CPU's BLAS/LAPACK kernels: compare runs on one machine.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LORAS = REPO / "lora_merge" / "data" / "toyworld" / "loras"
MODEL = ["--base", "toyworld", "--content-images", "toyworld:content", "--content-prompt", "a ohwx object",
         "--style-images", "toyworld:mrv", "--style-prompt", "mrv style", "--steps", "3"]
CASES = {
    "zip": ["-s", "ziplora"],
    "zip_in": ["-s", "ziplora", "--axis", "in", "--input-model", "identity"],
    "duo": ["-s", "duolora"],
    "duo_paper": ["-s", "duolora", "--preset", "paper"],
    "duo_noprior": ["-s", "duolora", "--priors", "none", "--strength", "free"],
    "zip_model": ["-s", "ziplora", "--mode", "model", *MODEL],
    "duo_model": ["-s", "duolora", "--mode", "model", *MODEL, "--prior-init"],
}


def tensor_hash(path: str) -> str:
    import torch
    from safetensors.torch import load_file

    t = load_file(path)
    h = hashlib.sha256()
    for name in sorted(t):
        h.update(name.encode())
        h.update(t[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--compare", type=Path, default=None, help="recorded hashes.json to compare with")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    res = {}
    for name, args in CASES.items():
        out = a.out / f"{name}.safetensors"
        cmd = [sys.executable, "-m", "lora_merge", "merge", str(LORAS / "ohwx.safetensors"),
               str(LORAS / "mrv.safetensors"), "-o", str(out), "--force", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode:
            sys.exit(f"{name}: {proc.stderr.strip().splitlines()[-1]}")
        for f in sorted(glob.glob(f"{a.out}/{name}.*safetensors")):
            res[os.path.basename(f)] = tensor_hash(f)
    print(json.dumps(res, indent=1))
    (a.out / "hashes.json").write_text(json.dumps(res, indent=1) + "\n")
    if a.compare is not None:
        want = json.loads(a.compare.read_text())
        diff = sorted(k for k in want.keys() | res.keys() if want.get(k) != res.get(k))
        print("identical" if not diff else f"DIFFERENT: {', '.join(diff)}")
        sys.exit(1 if diff else 0)


if __name__ == "__main__":
    main()
