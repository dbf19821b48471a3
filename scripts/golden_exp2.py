#!/usr/bin/env python3
"""Independent golden vectors for the contract's polynomial exponential (`exp2_fast`) and
the cross-entropy's exponential (`exp_from_max`), for sim/tests/golden.rs. Written from
the contract's text in ARCHITECTURE.md ("Transcendentals"), not from fp8train's code:
every f32 operation is computed exactly with rationals and rounded to f32 (round to
nearest, ties to even) here, with the standard library only. Run by hand; the output is
committed under sim/tests/golden/.

  python3 scripts/golden_exp2.py sim/tests/golden

exp2_fast.tsv: x (f32 bits) -> exp2_fast(x) (f32 bits). Inputs: every integer and
half-integer in [-130, 130] and their f32 neighbours, zeros, infinities, a NaN, and 6000
random f32 values in [-140, 140] and 2000 random bit patterns (seed 20261202).
exp_from_max.tsv: l, m (BF16 values as f32 bits) -> exp2_fast(fma(l, log2 e, -(m * log2 e)))
for 6000 random pairs with l <= m, as the cross-entropy takes its logits.
"""
import os, random, struct, sys
from fractions import Fraction

out = sys.argv[1] if len(sys.argv) > 1 else "."


def bits(x):
    return struct.unpack("<I", struct.pack("<f", x))[0]


def f32(b):
    return struct.unpack("<f", struct.pack("<I", b & 0xFFFFFFFF))[0]


def is_nan(x):
    return x != x


def round_f32(q, neg_zero=False):
    """The f32 nearest the rational q (ties to even), as a Python float holding it."""
    if q == 0:
        return -0.0 if neg_zero else 0.0
    s = -1 if q < 0 else 1
    m = abs(q)
    e = m.numerator.bit_length() - m.denominator.bit_length()
    if Fraction(2) ** e > m:
        e -= 1
    # 2^e <= m < 2^(e+1)
    quantum = Fraction(2) ** (max(e, -126) - 23)
    k, r = divmod(m, quantum)
    k = int(k)
    if r * 2 > quantum or (r * 2 == quantum and k % 2 == 1):
        k += 1
    v = k * quantum
    if v >= Fraction(2) ** 128:
        return s * float("inf")
    return s * float(v)  # exact: v has at most 24 significant bits


def add(a, b):
    if is_nan(a) or is_nan(b) or a in (float("inf"), float("-inf")) or b in (float("inf"), float("-inf")):
        return f32(bits(a + b))  # specials: IEEE's rules (exact in double, then f32)
    return round_f32(Fraction(a) + Fraction(b), neg_zero=(a == 0 and b == 0 and str(a)[0] == "-" and str(b)[0] == "-"))


def mul(a, b):
    if is_nan(a) or is_nan(b) or a in (float("inf"), float("-inf")) or b in (float("inf"), float("-inf")):
        return f32(bits(a * b))
    neg = (str(a)[0] == "-") != (str(b)[0] == "-")
    return round_f32(Fraction(a) * Fraction(b), neg_zero=neg)


def fma(a, b, c):
    specials = [x for x in (a, b, c) if is_nan(x) or x in (float("inf"), float("-inf"))]
    if specials:
        return f32(bits(a * b + c))  # (an infinite or NaN operand: the double result's class)
    q = Fraction(a) * Fraction(b) + Fraction(c)
    prod_neg = (str(a)[0] == "-") != (str(b)[0] == "-")
    both_neg_zero = q == 0 and a * b == 0 and prod_neg and str(c)[0] == "-" and c == 0
    return round_f32(q, neg_zero=both_neg_zero)


MAGIC = 12582912.0  # 1.5 * 2^23
P = [f32(0x3C1CCB1A), f32(0x3D650994), f32(0x3E76036D), f32(0x3F317070), f32(0x3F7FFFF4)]
LOG2E = f32(0x3FB8AA3B)


def exp2_fast(y):
    if is_nan(y):
        return y
    c = min(max(y, -126.0), 127.0)
    t = add(c, MAGIC)
    k = add(t, -MAGIC)
    f = add(c, -k)
    p = P[0]
    for q in P[1:]:
        p = fma(p, f, q)
    return f32(bits(p) + (bits(t) << 23))


def exp_from_max(l, m):
    ml = mul(m, LOG2E)
    return exp2_fast(fma(l, LOG2E, -ml))


def bf16(x):
    b = bits(x)
    return f32(((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16)


rng = random.Random(20261202)
xs = []
for i in range(-260, 261):
    v = i / 2
    xs += [v, f32(bits(v) + 1), f32(bits(v) - 1) if v != 0 else -0.0]
xs += [0.0, -0.0, float("inf"), float("-inf"), f32(0x7FC00000), f32(0x00000001), f32(0x80000001)]
xs += [f32(bits(rng.uniform(-140.0, 140.0))) for _ in range(6000)]
xs += [f32(rng.getrandbits(32)) for _ in range(2000)]
with open(os.path.join(out, "exp2_fast.tsv"), "w") as fh:
    fh.write("# x -> exp2_fast(x), f32 bits (scripts/golden_exp2.py)\n")
    for x in xs:
        fh.write(f"{bits(x):08x} {bits(exp2_fast(x)):08x}\n")
with open(os.path.join(out, "exp_from_max.tsv"), "w") as fh:
    fh.write("# l m -> exp2_fast(fma(l, log2 e, -(m log2 e))), f32 bits (scripts/golden_exp2.py)\n")
    for _ in range(6000):
        m = bf16(rng.uniform(-40.0, 40.0))
        l = bf16(m - abs(rng.gauss(0.0, 8.0)))
        fh.write(f"{bits(l):08x} {bits(m):08x} {bits(exp_from_max(l, m)):08x}\n")
print(f"wrote {len(xs)} exp2_fast rows and 6000 exp_from_max rows to {out}")
