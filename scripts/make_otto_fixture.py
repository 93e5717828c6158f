"""Converts OTTO session JSONL into the events Parquet fixture used by the tests.

  python scripts/make_otto_fixture.py --src=/path/otto_sample.jsonl --out=tests/data/otto_sample.parquet

Input lines: {"session": int, "events": [{"aid": int, "ts": ms, "type": "clicks"|"carts"|"orders"}]}.
Output columns: user_id (the session, as a string), timestamp (int64 s), page (str(aid)), event_type.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def convert(src: str) -> pa.Table:
  users, ts_ms, aids, types = [], [], [], []
  with open(src, encoding="utf-8") as f:
    for line in f:  # a one-off script over a small file
      if not line.strip():
        continue
      doc = json.loads(line)
      events = doc["events"]
      users += [str(doc["session"])] * len(events)
      ts_ms += [e["ts"] for e in events]
      aids += [str(e["aid"]) for e in events]
      types += [e["type"] for e in events]
  return pa.table(
    {
      "user_id": pa.array(users, pa.string()),
      "timestamp": pa.array(np.asarray(ts_ms, np.int64) // 1000),
      "page": pa.array(aids, pa.string()),
      "event_type": pa.array(types, pa.string()),
    }
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--src", required=True, help="OTTO JSONL (one session per line)")
  parser.add_argument("--out", required=True, help="output .parquet")
  args = parser.parse_args()
  table = convert(args.src)
  pq.write_table(table, args.out, compression="zstd")
  print(f"wrote {args.out}: {table.num_rows} events of {len(set(table['user_id'].to_pylist()))} users")


if __name__ == "__main__":
  main()
