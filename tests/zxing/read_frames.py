#!/usr/bin/env python3
"""Decode raw 8-bit luma frames with zxing-cpp, for tests/benches/decode_photos.rs (issue 16).

zxing-cpp is only the bench's measuring stick, never in the product's path. Install it with
`pip install -r tests/zxing/requirements.txt`.

Usage: read_frames.py MANIFEST. Each manifest line is `PATH<TAB>WIDTH<TAB>HEIGHT`, PATH holding
WIDTH*HEIGHT bytes of luma, row-major. Prints one line per frame, in order:
`ms<TAB>hex of the first QR code's UTF-8 text` (empty hex: no code). The time covers
zxing-cpp's read_barcodes only (QR codes, its default "try harder" options), the same span the
bench times for the project's decoder.
"""
import sys
import time

try:
    import zxingcpp
except ImportError:
    sys.exit("zxing-cpp is not installed: pip install -r tests/zxing/requirements.txt")


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: read_frames.py MANIFEST")
    with open(sys.argv[1], encoding="utf-8") as manifest:
        lines = [line.rstrip("\n") for line in manifest if line.strip()]
    out = sys.stdout
    for line in lines:
        path, width, height = line.split("\t")
        width, height = int(width), int(height)
        with open(path, "rb") as f:
            data = f.read()
        if len(data) != width * height:
            sys.exit(f"{path}: {len(data)} bytes, expected {width}x{height}")
        view = memoryview(data).cast("B", (height, width))
        start = time.perf_counter()
        found = zxingcpp.read_barcodes(view, formats=zxingcpp.BarcodeFormat.QRCode)
        ms = (time.perf_counter() - start) * 1000.0
        text = found[0].text if found else ""
        out.write(f"{ms:.3f}\t{text.encode('utf-8').hex()}\n")
    out.flush()


if __name__ == "__main__":
    main()
