"""Former home of the data helpers, kept as an import path: see decode, transforms, folder, collate."""

from lomar.data.collate import BadDataTracker, collate_pretrain  # noqa: F401
from lomar.data.decode import IMAGE_EXTENSIONS, decode_bytes, load_image  # noqa: F401
from lomar.data.folder import ImageListDataset, build_image_list, build_pretrain_dataset, demo_image_paths  # noqa: F401
from lomar.data.shards import TarShardDataset  # noqa: F401
from lomar.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Masker, PretrainTransform, denormalize, sample_generator  # noqa: F401
