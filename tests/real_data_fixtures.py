"""Fixture writers for the real-data tests (tests/test_data_karpathy.py, test_data_webdataset.py,
test_data_real_pipeline.py): tiny JPEGs, a Karpathy JSON with one corrupt and one missing image,
and a 2-shard webdataset. Everything is created under the test's tmp_path."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

# Karpathy fixture: 12 images, split by position; image 2 is corrupt, image 7 missing (both in
# train+restval), image 3 has 6 captions, image 4 one empty caption among its 5.
KARPATHY_SPLITS = ["train"] * 6 + ["restval"] * 2 + ["val"] * 2 + ["test"] * 2
CORRUPT, MISSING, SIX_CAPTIONS, EMPTY_CAPTION = 2, 7, 3, 4
COCO_ID_BASE = 1000


def jpeg_bytes(seed: int, size: tuple[int, int] | None = None) -> bytes:
  """A small RGB JPEG (size (W, H), random in [24, 64) when None) of seeded noise."""
  rng = np.random.default_rng(seed)
  width, height = size or tuple(int(v) for v in rng.integers(24, 64, 2))
  pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="JPEG", quality=90)
  return out.getvalue()


def caption(image: int, index: int) -> str:
  return f"photo {image} caption {index} shows a thing"


def write_karpathy(root: Path) -> tuple[Path, Path]:
  """(dataset_coco.json, image root) in COCO's layout: root/images/val2014/COCO_val2014_*.jpg."""
  image_root = root / "images"
  (image_root / "val2014").mkdir(parents=True)
  entries = []
  for i, split in enumerate(KARPATHY_SPLITS):
    filename = f"COCO_val2014_{i:012d}.jpg"
    if i == CORRUPT:
      (image_root / "val2014" / filename).write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    elif i != MISSING:
      (image_root / "val2014" / filename).write_bytes(jpeg_bytes(i))
    texts = [caption(i, c) for c in range(6 if i == SIX_CAPTIONS else 5)]
    if i == EMPTY_CAPTION:
      texts[1] = "  "
    entries.append({"filepath": "val2014", "filename": filename, "imgid": i,
                    "cocoid": COCO_ID_BASE + i, "split": split, "sentids": list(range(len(texts))),
                    "sentences": [{"raw": t, "tokens": t.split(), "imgid": i, "sentid": c}
                                  for c, t in enumerate(texts)]})
  json_path = root / "dataset_coco.json"
  json_path.write_text(json.dumps({"dataset": "coco", "images": entries}))
  return json_path, image_root


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


# Webdataset fixture: 2 shards of 5 samples, keys "%09d" % (shard * 100 + i). Shard 0 has .txt
# captions, shard 1 .json ones in every accepted form. Sample 000000002: corrupt JPEG; 000000003:
# no image; 000000104: empty caption.
WDS_CORRUPT, WDS_NO_IMAGE, WDS_EMPTY_CAPTION = "000000002", "000000003", "000000104"


def wds_key(shard: int, i: int) -> str:
  return f"{shard * 100 + i:09d}"


def wds_json_caption(i: int, text: str):
  return [text, [text, text + " again"], {"caption": text}, {"captions": [text]},
          {"caption": ""}][i]


def write_webdataset(root: Path) -> list[Path]:
  """root/shards-000000.tar and root/shards-000001.tar."""
  shards = []
  for shard in range(2):
    path = root / f"shards-{shard:06d}.tar"
    with tarfile.open(path, "w") as tar:
      for i in range(5):
        key = wds_key(shard, i)
        text = caption(shard * 100 + i, 0)
        if key == WDS_CORRUPT:
          add_member(tar, f"{key}.jpg", b"garbage, not an image")
        elif key != WDS_NO_IMAGE:
          add_member(tar, f"{key}.jpg", jpeg_bytes(shard * 100 + i))
        if shard == 0:
          add_member(tar, f"{key}.txt", text.encode())
        else:
          add_member(tar, f"{key}.json", json.dumps(wds_json_caption(i, text)).encode())
    shards.append(path)
  return shards
