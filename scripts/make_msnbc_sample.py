"""Builds the packaged MSNBC sample: the header and the lines of a seeded random subset of users.

  python scripts/make_msnbc_sample.py --src=/path/msnbc990928.zip \
      --out=hetlm_jax/data/samples/msnbc_sample.seq.gz --users=20000 --seed=0
"""

from __future__ import annotations

import argparse
import gzip
import io
import re
import zipfile

import numpy as np


def load_seq(src: str) -> bytes:
  """The msnbc990928.seq bytes from the UCI zip, a .gz or the plain file."""
  if src.endswith(".zip"):
    with zipfile.ZipFile(src) as zf:
      (name,) = [n for n in zf.namelist() if n.endswith(".seq") and not n.startswith("__MACOSX/")]
      return zf.read(name)
  with open(src, "rb") as f:
    data = f.read()
  return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def make_sample(data: bytes, users: int, seed: int) -> bytes:
  """Same header, then `users` sequence lines picked by default_rng(seed).permutation, in file order."""
  marker = re.search(rb"^%[ \t]*Sequences:?[^\n]*\n", data, re.M)
  if marker is None:
    raise SystemExit("no '% Sequences:' line: not an MSNBC file")
  body = data[marker.end() :]
  stripped = body.lstrip(b" \t\r\n")
  header = data[: len(data) - len(stripped)]  # blank lines after the marker stay in the header
  newline = b"\r\n" if b"\r\n" in header else b"\n"
  lines = stripped.split(b"\n")
  if lines and not lines[-1].strip():
    lines.pop()  # text after the final newline is not a line
  if users > len(lines):
    raise SystemExit(f"--users={users} but the file has only {len(lines)} users")
  keep = np.sort(np.random.default_rng(seed).permutation(len(lines))[:users])
  picked = [lines[i].rstrip(b"\r") for i in keep.tolist()]
  return header + newline.join(picked) + newline


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--src", required=True, help="msnbc990928.zip (or .seq / .seq.gz)")
  parser.add_argument("--out", required=True, help="output .seq.gz")
  parser.add_argument("--users", type=int, default=20000)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  sample = make_sample(load_seq(args.src), args.users, args.seed)
  # mtime=0 and no file name in the gzip header make the output byte-reproducible.
  buf = io.BytesIO()
  with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
    gz.write(sample)
  with open(args.out, "wb") as f:
    f.write(buf.getvalue())
  print(f"wrote {args.out}: {args.users} users, {len(sample)} bytes uncompressed, {len(buf.getvalue())} compressed")


if __name__ == "__main__":
  main()
