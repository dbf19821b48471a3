#!/usr/bin/env python3
"""Independent FP8 golden vectors for sim/tests/golden.rs, from ml_dtypes (not from
fp8train). Run by hand; the output is committed under sim/tests/golden/.

  python3 -m venv /tmp/g && /tmp/g/bin/pip install ml_dtypes==0.6.0 numpy
  /tmp/g/bin/python scripts/golden_fp8.py sim/tests/golden

fp8_decode.tsv: every code -> its value as f32 bits, E4M3 (e4m3fn) and E5M2.
fp8_encode.tsv: f32 inputs -> the nearest code (round to nearest even, no saturation:
ml_dtypes' astype). Inputs: every FP8 value of both formats, the f32 neighbours of every
value and of every midpoint between neighbouring values (where rounding flips), zeros,
infinities, NaNs, the f32 extremes, and 20000 random f32 bit patterns (seed 20261130).
"""
import os, sys
import numpy as np
import ml_dtypes

out = sys.argv[1] if len(sys.argv) > 1 else "."
E4, E5 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2


def f32_bits(x):
    b = np.asarray(x, dtype=np.float32).view(np.uint32).copy()
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    b[nan] = np.where(b[nan] & 0x80000000, 0xFFC00000, 0x7FC00000)
    return b


codes = np.arange(256, dtype=np.uint8)
d4 = codes.view(E4).astype(np.float32)
d5 = codes.view(E5).astype(np.float32)
with open(os.path.join(out, "fp8_decode.tsv"), "w") as f:
    f.write(f"# code\te4m3fn_as_f32_bits\te5m2_as_f32_bits   (ml_dtypes {ml_dtypes.__version__}; "
            "NaN payloads canonicalised to 7fc00000/ffc00000 by sign; scripts/golden_fp8.py)\n")
    for c, a, b in zip(codes, f32_bits(d4), f32_bits(d5)):
        f.write(f"{c:02x}\t{a:08x}\t{b:08x}\n")

inputs = set()


def add(vals):
    for v in np.asarray(vals, dtype=np.float32).ravel():
        b = int(np.float32(v).view(np.uint32))
        for d in (-2, -1, 0, 1, 2):
            nb = (b + d) & 0xFFFFFFFF
            # stay on the same side of zero: no wrap from +0 to -NaN
            if (nb ^ b) & 0x80000000 == 0:
                inputs.add(nb)


for dec in (d4, d5):
    vals = np.unique(dec[np.isfinite(dec)])
    add(vals)
    mids = (vals[:-1].astype(np.float64) + vals[1:].astype(np.float64)) / 2
    add(mids.astype(np.float32))
    add(vals * 2)  # beyond the largest value: overflow without saturation
for b in (0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF, 0x00000001,
          0x80000001, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0xFF7FFFFF):
    inputs.add(b)
rng = np.random.default_rng(20261130)
inputs.update(int(x) for x in rng.integers(0, 2**32, size=20000, dtype=np.uint64))

xs = np.array(sorted(inputs), dtype=np.uint32).view(np.float32)
with np.errstate(over="ignore", invalid="ignore"):
    c4 = xs.astype(E4).view(np.uint8)
    c5 = xs.astype(E5).view(np.uint8)
with open(os.path.join(out, "fp8_encode.tsv"), "w") as f:
    f.write(f"# f32_bits\te4m3fn_code\te5m2_code   (ml_dtypes {ml_dtypes.__version__} astype: round-to-nearest-even, "
            "no saturation; NaN inputs: any NaN code is acceptable; scripts/golden_fp8.py)\n")
    for x, a, b in zip(xs.view(np.uint32), c4, c5):
        f.write(f"{x:08x}\t{a:02x}\t{b:02x}\n")
print(f"wrote {len(codes)} decode rows and {len(xs)} encode rows to {out}")
