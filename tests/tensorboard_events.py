"""Reads the scalars of TensorBoard event files (TFRecord framing of Event protos) with tensorboardX's protos."""

import struct
from pathlib import Path


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
  from tensorboardX.proto import event_pb2

  out = {}
  for path in sorted(Path(run_dir).glob("events.out.tfevents.*")):
    data, i = path.read_bytes(), 0
    while i + 12 <= len(data):  # length (8 bytes), its CRC (4), the record, its CRC (4)
      (n,) = struct.unpack("<Q", data[i : i + 8])
      event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
      i += 12 + n + 4
      for value in event.summary.value:
        out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out
