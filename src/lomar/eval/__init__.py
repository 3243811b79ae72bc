"""Evaluation of frozen or finetuned encoders: features, k-NN, linear probe, COCO AP, segmentation mIoU."""
