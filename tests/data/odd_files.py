"""Small crafted files (a JPEG, tar members) and the samples a shard of them yields, for the tests of inputs real
data sets hold."""

import io
import tarfile

import numpy as np
from PIL import Image

from lomar.data.shards import TarShardDataset
from lomar.data.transforms import PretrainTransform


def _jpeg() -> bytes:
    out = io.BytesIO()
    Image.fromarray((np.random.RandomState(0).rand(20, 30, 3) * 255).astype(np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data)
    archive.addfile(info, io.BytesIO(data) if data else None)


def _items(shard) -> dict:
    dataset = TarShardDataset([shard], PretrainTransform(16), shuffle_buffer=1)
    dataset.count_samples()
    return {item["path"].split(":")[-1]: item for item in dataset}
