#!/usr/bin/env python3
"""A stand-in for a GGUF model on a machine that cannot download one (docs/gpu.sh).

    gpu-model.py header MODEL.gguf HEADER.bin   # here: the model's header (metadata + tensor table)
    gpu-model.py inflate HEADER.bin OUT.gguf    # there: the same file with random weights

The header of the 1.5B is ~6 MB against ~1.1 GB of weights, so it travels where the model
cannot. `inflate` writes a GGUF with the original metadata (architecture, tokenizer, chat
template) and the original tensor table: every tensor keeps its name, shape, quantisation type
and offset, so the file has the model's exact size and layout, and memory and speed measured on
it are the real model's. Its weights are random (seeded) with a trained model's scale: zero-mean
quantised blocks of std ~0.02 (fixed block scales, random codes), norms 1, biases small. Losses, tickets and accuracy measured on it
mean nothing. Needs numpy for `inflate`; `header` needs only the standard library.
"""
import struct
import sys

# ggml type id: (name, weights per block, bytes per block)
TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144),
    14: ("Q6_K", 256, 210),
}
# GGUF metadata value types: fixed-size ones by id; 8 = string, 9 = array
FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, fmt):
        v = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return v[0] if len(v) == 1 else v

    def string(self):
        n = self.take("Q")
        s = self.data[self.pos : self.pos + n]
        self.pos += n
        return s.decode("utf-8", "replace")

    def value(self, t):
        if t in FIXED:
            raw = self.data[self.pos : self.pos + FIXED[t]]
            self.pos += FIXED[t]
            return raw
        if t == 8:
            return self.string()
        if t == 9:
            et, n = self.take("I"), self.take("Q")
            if et in FIXED:
                self.pos += FIXED[et] * n
                return None
            return [self.value(et) for _ in range(n)]
        raise SystemExit(f"unknown GGUF value type {t} at byte {self.pos}")


def parse(data):
    """The header's tensor table and where the tensor data starts."""
    r = Reader(data)
    if r.take("4s") != b"GGUF":
        raise SystemExit("not a GGUF file")
    version, n_tensors, n_kv = r.take("I"), r.take("Q"), r.take("Q")
    if version < 2:
        raise SystemExit(f"GGUF version {version} is not supported")
    alignment = 32
    for _ in range(n_kv):
        key, t = r.string(), r.take("I")
        v = r.value(t)
        if key == "general.alignment":
            alignment = struct.unpack("<I", v)[0]
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.take("Q") for _ in range(r.take("I"))]
        ggml_type, offset = r.take("I"), r.take("Q")
        tensors.append((name, dims, ggml_type, offset))
    start = (r.pos + alignment - 1) // alignment * alignment
    return tensors, start


def header(src, dst):
    with open(src, "rb") as f:
        head = f.read(64 << 20)
    tensors, start = parse(head)
    with open(dst, "wb") as f:
        f.write(head[:start])
    print(f"{dst}: {start} bytes, {len(tensors)} tensors")


def inflate(src, dst, seed=7):
    import numpy as np

    head = open(src, "rb").read()
    tensors, start = parse(head)
    if len(head) != start:
        raise SystemExit(f"{src}: expected a header of {start} bytes, found {len(head)}")
    rng = np.random.default_rng(seed)
    with open(dst + ".part", "wb") as f:
        f.write(head)
        for name, dims, t, offset in sorted(tensors, key=lambda x: x[3]):
            if t not in TYPES:
                raise SystemExit(f"{name}: ggml type {t} is not supported by this stand-in")
            kind, per_block, block_bytes = TYPES[t]
            n = int(np.prod(dims))
            f.write(b"\0" * (start + offset - f.tell()))  # alignment padding
            if kind == "F32":
                v = np.ones(n, "<f4") if "norm" in name else rng.normal(0, 0.02, n).astype("<f4")
                f.write(v.tobytes())
            elif kind == "F16":
                f.write(rng.normal(0, 0.02, n).astype("<f2").tobytes())
            else:
                blocks = rng.integers(0, 256, (n // per_block, block_bytes), dtype=np.uint8)
                scale = lambda x: np.frombuffer(np.float16(x).tobytes(), np.uint8)
                if kind == "Q8_0":  # d, then 32 int8 codes
                    blocks[:, 0:2] = scale(3e-4)
                elif kind == "Q4_K":  # d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of codes
                    # Every scale byte 0x11 unpacks to scale = min (17 or 1) in all 8 sub-blocks,
                    # so with dmin = 7.5 d a weight is d * scale * (q - 7.5): zero mean, std ~0.02.
                    # (Random scales give every weight a positive mean and the activations blow
                    # up through the layers, unlike a trained model's.)
                    blocks[:, 0:2] = scale(2.6e-4)
                    blocks[:, 2:4] = scale(7.5 * 2.6e-4)
                    blocks[:, 4:16] = 0x11
                elif kind == "Q6_K":  # 192 bytes of codes, 16 int8 scales, then d
                    # d * scale * (q - 32): zero mean, std ~0.02 for random codes and scales
                    blocks[:, 208:210] = scale(1.7e-5)
                f.write(blocks.tobytes())
    import os

    os.replace(dst + ".part", dst)
    print(f"{dst}: {os.path.getsize(dst)} bytes, {len(tensors)} tensors, random weights (seed {seed})")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("header", "inflate"):
        raise SystemExit(__doc__)
    (header if sys.argv[1] == "header" else inflate)(sys.argv[2], sys.argv[3])
