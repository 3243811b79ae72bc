"""Former home of frozen-encoder evaluation, kept as an import path: see features, knn, linear_probe."""

from lomar.eval.features import (  # noqa: F401
                                 LoadReport,
                                 eval_transform,
                                 extract_features,
                                 knn_loaders,
                                 load_pretrained_encoder,
                                 write_json,
)
from lomar.eval.knn import KnnMonitor, knn_accuracy, knn_predict  # noqa: F401
from lomar.eval.linear_probe import LinearProbe, train_linear_probe  # noqa: F401
