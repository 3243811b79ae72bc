"""Images in: discovery, decoding, augmentation and sharded reading for pretraining; classification, COCO and
ADE20K-layout datasets for the downstream tasks; the compose-digits set."""
