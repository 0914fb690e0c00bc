"""Keeps three entries of a llama.cpp importance matrix (GGUF or legacy .dat), unchanged.

usage: cut.py IN OUT   (the format follows IN's suffix; GGUF needs gguf-py on PYTHONPATH)
"""
import struct
import sys

KEEP = ["blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.29.ffn_gate.weight"]


def cut_gguf(src, dst):
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, arch=None)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        if field.name == "general.type":
            writer.add_type(value)
        elif field.name == "imatrix.datasets":
            writer.add_array(field.name, value)
        else:
            writer.add_uint32(field.name, value)
    names = {t.name: t for t in reader.tensors}
    for entry in KEEP:
        for suffix in (".in_sum2", ".counts"):
            t = names[entry + suffix]
            # GGML dims are innermost first; gguf-py wants numpy's (outermost first) shape.
            shape = list(reversed([int(d) for d in t.shape]))
            writer.add_tensor(t.name, t.data.reshape(shape), raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def cut_dat(src, dst):
    data = open(src, "rb").read()
    pos = 0

    def take(fmt):
        nonlocal pos
        values = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return values

    (n_entries,) = take("<i")
    entries = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        name = data[pos : pos + length].decode()
        pos += length
        ncall, nval = take("<ii")
        sums = data[pos : pos + 4 * nval]
        pos += 4 * nval
        entries[name] = (ncall, nval, sums)
    tail = data[pos:]  # chunk count and dataset name
    out = struct.pack("<i", len(KEEP))
    for name in KEEP:
        ncall, nval, sums = entries[name]
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, nval) + sums
    open(dst, "wb").write(out + tail)


if __name__ == "__main__":
    src, dst = sys.argv[1], sys.argv[2]
    (cut_gguf if src.endswith(".gguf") else cut_dat)(src, dst)
