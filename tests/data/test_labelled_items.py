"""Class-folder items and batches carry more than their elements (an item's image size, a batch's skipped files and
sizes): what a loader worker sends through its pipe, pickled, keeps it."""

import pickle

import pytest
import torch

from lomar.data.collate import LabelledItem, collate_labelled


def test_an_item_and_its_batch_keep_their_sizes_and_skipped_files_when_pickled():
    item = pickle.loads(pickle.dumps(LabelledItem(torch.zeros(3, 4, 4), 1, "a.png", (30, 40))))
    image, label, path = item  # three elements, as code unpacking an item expects
    assert (label, path, item.source) == (1, "a.png", (30, 40)) and image.shape == (3, 4, 4)
    batch = pickle.loads(pickle.dumps(collate_labelled([item, LabelledItem(None, 0, "bad.png")])))
    assert batch.bad == ["bad.png"] and batch.sources == [("a.png", 30, 40)]
    assert batch[0].shape == (1, 3, 4, 4) and batch[1].tolist() == [1]


def test_a_batch_of_pil_images_is_named_with_the_transform_it_lacks():
    # a LabelledImageFolder built without a transform gives PIL images: torch.stack said only 'expected Tensor as
    # element 0 in argument 0, but got Image'
    from PIL import Image

    with pytest.raises(TypeError, match=r"collate_labelled stacks image tensors, got PIL.Image.Image \(a.png\); give "
                                        r"the dataset a transform that ends in one"):
        collate_labelled([LabelledItem(Image.new("RGB", (4, 4)), 0, "a.png")])
