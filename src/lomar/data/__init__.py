"""Image discovery, decoding, augmentation and sharded reading for pretraining."""
