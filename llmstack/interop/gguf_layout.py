"""The GGUF header walked by hand, every count and length checked against the file, before anything is allocated.

``gguf.GGUFReader`` trusts the header: a 121-byte file claiming a 2**40-element array made it grow to 7 GB.
``check_gguf_layout`` runs first on every import (``gguf.py``) and raises ``ModelFileError`` naming the file
and the first field that does not fit.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path
from typing import Any

from llmstack.training.checkpoint import ModelFileError

VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
"""Bytes of each fixed-size GGUF metadata value type (uint8 .. float64; 8 is a string, 9 an array)."""
GGUF_STRING, GGUF_ARRAY, GGUF_UINT32 = 8, 9, 4
MAX_METADATA_ITEMS, MAX_TENSORS = 1 << 21, 1 << 16
"""Bounds on a file's metadata array elements (``GGUFReader`` keeps a numpy view per element, ~0.7 KB and ~8 us
each with gguf 0.19; Llama 3's 128k tokens + 280k merges stay well under) and on its tensors (a few thousand)."""


def check_gguf_layout(path: Path) -> None:
    """Refuse a GGUF file whose header promises more than the file holds, before ``GGUFReader`` allocates for it.

    The reader trusts every count and length in the header (a 121-byte file claiming a 2**40-element array grew
    it to 7 GB). Here each one is checked against the bytes left in the file, the metadata's array elements and
    the tensor count against ``MAX_METADATA_ITEMS`` / ``MAX_TENSORS``, and each tensor's data against the end
    of the file. Raises ``ModelFileError`` naming the file and the first field that does not fit.
    """
    size = path.stat().st_size
    if size < 24:
        raise ModelFileError(path, f"not a GGUF file ({size} bytes, shorter than a GGUF header)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        _GGUFHeader(buf, path).check()


class _GGUFHeader:
    """A walk over a GGUF header (magic, version, counts, metadata, tensor infos) with every length bounded."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.path, self.size, self.pos, self.order, self.items = buf, path, len(buf), 0, "<", 0

    def fail(self, reason: str) -> ModelFileError:
        return ModelFileError(self.path, f"damaged GGUF file: {reason}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(
                f"{what} needs {n:,} bytes at offset {self.pos:,}; the file has {self.size - self.pos:,} left"
            )

    def read(self, fmt: str, what: str) -> int:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> bytes:
        n = self.read("Q", f"{what}'s length")
        self.need(n, f"{what} ({n:,} bytes)")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos])

    def value(self, vtype: int, what: str) -> None:
        if vtype == GGUF_ARRAY:
            itype, count = self.read("I", what), self.read("Q", what)
            self.items += count
            if self.items > MAX_METADATA_ITEMS:
                raise self.fail(f"{what}: {self.items:,} metadata array elements, more than {MAX_METADATA_ITEMS:,}")
            if itype not in VALUE_SIZES and itype != GGUF_STRING:  # llama.cpp reads no nested arrays either
                raise self.fail(f"{what}: an array of value type {itype}")
            self.need(count * VALUE_SIZES.get(itype, 8), f"{what} (an array of {count:,} elements)")
            for _ in range(count if itype == GGUF_STRING else 0):
                self.string(what)
            self.pos += count * VALUE_SIZES.get(itype, 0)
        elif vtype == GGUF_STRING:
            self.string(what)
        elif vtype in VALUE_SIZES:
            self.need(VALUE_SIZES[vtype], what)
            self.pos += VALUE_SIZES[vtype]
        else:
            raise self.fail(f"{what}: unknown value type {vtype}")

    def check(self) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # heavy: see import_gguf

        if bytes(self.buf[:4]) != b"GGUF":
            raise self.fail(f"the file starts with {bytes(self.buf[:4])!r}, not the GGUF magic")
        self.pos = 4
        version = self.read("I", "version")
        if version & 0xFFFF == 0:  # written on a big-endian machine
            self.order, self.pos = ">", 4
            version = self.read("I", "version")
        if version not in (2, 3):
            raise self.fail(f"version {version} (supported: 2, 3)")
        n_tensors, n_kv = self.read("Q", "tensor count"), self.read("Q", "metadata count")
        if n_tensors > MAX_TENSORS:
            raise self.fail(f"{n_tensors:,} tensors, more than {MAX_TENSORS:,}")
        self.need(n_kv * 13 + n_tensors * 24, f"{n_kv:,} metadata entries and {n_tensors:,} tensor infos")
        alignment = 32
        for i in range(n_kv):
            key = self.string(f"metadata key {i}")
            what = f"metadata {key[:60].decode('utf-8', 'replace')!r}"
            vtype = self.read("I", what)
            if key == b"general.alignment" and vtype == GGUF_UINT32:
                alignment = self.read("I", what)
            else:
                self.value(vtype, what)
        if alignment <= 0 or alignment & (alignment - 1):
            raise self.fail(f"general.alignment {alignment} is not a power of two")
        tensors = []
        for i in range(n_tensors):
            name = self.string(f"tensor {i}'s name").decode("utf-8", "replace")
            n_dims = self.read("I", f"tensor {name}'s dimension count")
            if n_dims > 4:
                raise self.fail(f"tensor {name} has {n_dims} dimensions (GGUF allows 4)")
            dims = [self.read("Q", f"tensor {name}'s shape") for _ in range(n_dims)]
            tensors.append(
                (name, dims, self.read("I", f"tensor {name}'s type"), self.read("Q", f"tensor {name}'s offset"))
            )
        data_start = -(-self.pos // alignment) * alignment
        for name, dims, ttype, offset in tensors:
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                raise self.fail(f"tensor {name} has unknown type {ttype}") from None
            start = data_start + offset
            end = start + math.prod(dims) * type_size // block
            if end > self.size:
                raise self.fail(f"tensor {name}'s data (bytes {start:,}..{end:,}) runs past the end ({self.size:,})")
