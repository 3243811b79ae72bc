"""The CPU device the bench tests build their runners on."""

import torch

CPU = torch.device("cpu")
