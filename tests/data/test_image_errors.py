"""The data layer's error of an image file: its path and reason apart, its message the one users read."""

import io
import pickle

import numpy as np
import pytest
from PIL import Image
from torch._utils import ExceptionWrapper

from lomar.data.decode import decode_box_reduced, open_pil, read_image_bytes
from lomar.data.image_errors import READ, ImageFileError, reason


def test_an_image_file_error_says_its_file_and_reason_and_pickles_whole():
    """Pickled (as a process hands it on), it is rebuilt from its parts: the same path, reason and message."""
    error = ImageFileError("/data/a.jpg", "the file is empty (0 bytes)")
    assert isinstance(error, ValueError)
    assert str(error) == "cannot decode image /data/a.jpg: the file is empty (0 bytes)"
    again = pickle.loads(pickle.dumps(error))
    assert (again.path, again.reason, str(again)) == (error.path, error.reason, str(error))
    unread = ImageFileError("/data/b.jpg", "it is a folder, not an image file; remove it from the data", READ)
    assert str(unread).startswith("cannot read /data/b.jpg: it is a folder") and reason(unread) == unread.reason
    assert reason(OSError("image file is truncated")) == "image file is truncated"


def test_an_image_file_error_a_loader_worker_raises_reaches_the_loop_as_a_value_error():
    """A DataLoader worker sends its error as its type and text (pickled), and the loop rebuilds it from the text
    alone: a ValueError there, as it left the worker, not torch's RuntimeError for a type it cannot rebuild."""
    try:
        raise ImageFileError("/data/a.jpg", "the file is empty (0 bytes)")
    except ImageFileError:
        sent = pickle.loads(pickle.dumps(ExceptionWrapper(where="in DataLoader worker process 0")))
    with pytest.raises(ImageFileError, match="cannot decode image /data/a.jpg: the file is empty") as caught:
        sent.reraise()
    assert isinstance(caught.value, ValueError) and reason(caught.value) == str(caught.value)
    again = pickle.loads(pickle.dumps(caught.value))
    assert (type(again), str(again), reason(again)) == (ImageFileError, str(caught.value), reason(caught.value))


def test_a_reader_refusal_carries_the_file_and_reason_apart(tmp_path):
    with pytest.raises(ImageFileError) as caught:
        read_image_bytes(tmp_path)
    assert caught.value.path == str(tmp_path) and caught.value.reason.startswith("it is a folder")


def test_a_jpeg_cut_without_its_end_is_named_by_its_file_in_a_reduced_decode(tmp_path):
    """Pillow's own 'image file is truncated' names no file: the crops' reduced decode (pretrain's --decode draft and
    windows) says which, as decode_bytes does."""
    out = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(out, format="JPEG", quality=90)
    data = out.getvalue()[:len(out.getvalue()) // 2]  # a partial download: no EOI marker
    with open_pil(data, "cut.jpg") as img, pytest.raises(ImageFileError) as caught:
        decode_box_reduced(img, (0, 0, 96, 128), 16, "cut.jpg")
    assert str(caught.value) == f"cannot decode image cut.jpg: {caught.value.reason}"
    assert caught.value.path == "cut.jpg" and "truncated" in caught.value.reason
