#!/usr/bin/env python3
"""Independent check of the PROTOCOL.md test vectors (Python standard library only).

Recomputes, without any citycard code, from the documented fields and frames:
  - every card key (HKDF-SHA256 written out from RFC 5869 on top of `hmac`),
  - every request cryptogram and offline certificate (input assembled from the fields),
  - every response MAC (input assembled from the frame bytes),
and checks they equal the documented values and the bytes inside the frames. If the
`cryptography` package is installed it also checks the Ed25519 assertion key and signature.

Usage: python3 protocol/tools/crosscheck_vectors.py [path/to/PROTOCOL.md]
"""
import hashlib
import hmac
import os
import struct
import sys


def parse(path):
    text = open(path, encoding="utf-8").read()
    section = text.split("\n## Test vectors", 1)[1].split("\n## ", 1)[0]
    blocks, current, inside = {}, [], False
    for line in section.splitlines():
        if line.startswith("```"):
            if inside and current and current[0][0] == "vector":
                blocks[current[0][1]] = dict(current)
            current, inside = [], not inside
            continue
        if not inside:
            continue
        if line[:1].isspace():
            current[-1] = (current[-1][0], current[-1][1] + " " + line.strip())
        else:
            key, value = line.split(":", 1)
            current.append((key.strip(), value.strip()))
    return blocks


def unhex(s):
    return bytes.fromhex("".join(s.split()))


def hkdf_sha256(salt, ikm, info, length):
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, t, i = b"", b"", 1
    while len(okm) < length:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
        okm += t
        i += 1
    return okm[:length]


def tag(key, data):
    return hmac.new(key, data, hashlib.sha256).digest()[:16]


def enum_value(s):
    # "Lost (1)" -> 1
    return int(s.rsplit("(", 1)[1].rstrip(")"))


def terminal(block):
    tid = block["terminal_id"].encode()
    return bytes([len(tid)]) + tid


def check_signature(key_block, message, signature):
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives import serialization
    except ImportError:
        print("cryptography not installed: Ed25519 signature not checked")
        return False
    private = Ed25519PrivateKey.from_private_bytes(unhex(key_block["assertion_seed"]))
    public = private.public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert raw == unhex(key_block["assertion_public_key"]), "assertion public key"
    assert private.sign(message) == signature, "signature differs"
    public.verify(signature, message)
    return True


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "PROTOCOL.md")
    blocks = parse(path)
    counts = {"card keys": 0, "cryptograms": 0, "certificates": 0, "macs": 0, "zero macs": 0,
              "signatures": 0}
    for name, b in blocks.items():
        if name.startswith("card-key"):
            info = struct.pack(">HQ", int(b["key_version"]), int(b["card_id"]))
            key = hkdf_sha256(b"citycard card key v1", unhex(b["master_key"]), info, 32)
            assert key == unhex(b["card_key"]), name
            counts["card keys"] += 1
        if "assertion" in b:
            fields = struct.pack(">QIQQQ", int(b["card_id"]), int(b["atc"]), int(b["journal_seq"]),
                                 int(b["issued_ms"]), int(b["expires_ms"]))
            assertion = b"CCID\x01" + fields + terminal(b)
            assert assertion == unhex(b["assertion"]), name
            assert int(b["expires_ms"]) == int(b["issued_ms"]) + 300_000, name
            if check_signature(blocks["assertion-key"], assertion, unhex(b["signature"])):
                counts["signatures"] += 1
        if "frame" not in b:
            continue
        frame = unhex(b["frame"])
        assert frame[:3] == b"CC\x01", name
        (body_len,) = struct.unpack(">I", frame[12:16])
        body = frame[16:]
        assert len(body) == body_len, name
        mtype = frame[3]
        if "cryptogram" in b:
            # TapOut names its amount "fare"; an Inquiry carries the original request's
            # cryptogram, over the original type.
            amount = int(b.get("amount", b.get("fare", "0")))
            ctype = int(b["original_type"].split("(")[1].rstrip(")"), 0) if "original_type" in b else mtype
            data = (b"CCRQ\x01" + bytes([ctype])
                    + struct.pack(">QIqQ", int(b["card_id"]), int(b["atc"]), amount,
                                  int(b["nonce"], 0))
                    + terminal(b))
            assert data == unhex(b["cryptogram_input"]), name
            c = tag(unhex(b["card_key"]), data)
            assert c == unhex(b["cryptogram"]) == body[20:36], name
            counts["cryptograms"] += 1
        i = 0
        while f"record[{i}].certificate" in b:
            p = f"record[{i}]."
            data = (b"CCOF\x01"
                    + struct.pack(">QIqQQ", int(b[p + "card_id"]), int(b[p + "atc"]),
                                  int(b[p + "amount"]), int(b[p + "time_ms"]),
                                  int(b[p + "nonce"], 0))
                    + terminal(b))
            assert data == unhex(b[p + "certificate_input"]), name
            c = tag(unhex(b["card_key"]), data)
            # 52 bytes a record; 61 in a NumberedOfflineBatch (terminal_seq u64, flags u8 after).
            stride = 61 if mtype == 0x14 else 52
            assert c == unhex(b[p + "certificate"]) == body[2 + stride * i + 36:2 + stride * i + 52], name
            if mtype == 0x14:
                seq, flags = struct.unpack(">QB", body[2 + stride * i + 52:2 + stride * (i + 1)])
                assert seq == int(b[p + "terminal_seq"]) and flags == int(b[p + "flags"], 0), name
            counts["certificates"] += 1
            i += 1
        if "mac_input" in b:
            data = b"CCRS\x01" + bytes([mtype]) + unhex(b["binding"]) + body[:-16]
            assert data == unhex(b["mac_input"]), name
            m = tag(unhex(b["card_key"]), data)
            assert m == unhex(b["mac"]) == body[-16:], name
            counts["macs"] += 1
        elif "mac" in b:
            assert unhex(b["mac"]) == bytes(16) == body[-16:], name
            counts["zero macs"] += 1
        i = 0
        while f"result[{i}].mac" in b:
            p = f"result[{i}]."
            # NumberedOfflineResults: highest_seq u64 and count u16, then terminal_seq u64 before
            # each 45-byte result.
            start, stride = (18, 53) if mtype == 0x94 else (2, 45)
            rec = body[start + stride * i:start + stride * i + 45]
            if mtype == 0x94:
                seq = struct.unpack(">Q", body[start + stride * i - 8:start + stride * i])[0]
                assert seq == int(b[p + "terminal_seq"]), name
            fields = struct.pack(">BQIqQ", enum_value(b[p + "status"]), int(b[p + "card_id"]),
                                 int(b[p + "atc"]), int(b[p + "balance"]), int(b[p + "journal_seq"]))
            assert fields == rec[:29], name
            if p + "mac_input" not in b:
                # An unauthenticated result: all-zero MAC.
                assert unhex(b[p + "mac"]) == bytes(16) == rec[29:], name
                counts["zero macs"] += 1
                i += 1
                continue
            data = b"CCRS\x01" + bytes([mtype]) + unhex(b[p + "binding"]) + rec[:29]
            assert data == unhex(b[p + "mac_input"]), name
            m = tag(unhex(b["card_key"]), data)
            assert m == unhex(b[p + "mac"]) == rec[29:], name
            counts["macs"] += 1
            i += 1
    print(f"{len(blocks)} vectors; checked " + ", ".join(f"{v} {k}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
