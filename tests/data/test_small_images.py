"""lomar.data.small_images: a split's images smaller than a resize, counted in each process's share and joined."""

from lomar.data.small_images import SmallImages


def test_the_shares_of_several_processes_join_into_one_count():
    whole, other = SmallImages(36), SmallImages(36)
    whole.add([("a.png", 20, 30), ("big.png", 36, 40)])
    other.add([("b.png", 10, 12)])
    whole.join(other.count, other.smallest)
    whole.join(0, None)  # a process whose share held none
    assert whole.line() == "2 images smaller than the 36 px resize upscaled, the smallest 12x10 (b.png)"
    assert SmallImages(36).line() == ""
