"""lomar.eval.knn's defaults and the banks its scores must take as F.normalize does: DINO's k and temperature where
none is given (``pretrain --knn-every`` gives none), a zero feature row, features below float32."""

from unittest.mock import ANY

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lomar.eval import knn
from lomar.eval.knn import KnnMonitor, knn_predict


def _bank(rows: int = 60, dim: int = 16, classes: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, dim, generator=gen), torch.randint(0, classes, (rows,), generator=gen),
            torch.randn(9, dim, generator=gen))


def test_knn_predict_defaults_to_dinos_k_20_and_temperature_0_07():
    bank, labels, query = _bank()  # more than 20 rows: a 21st neighbour would vote
    assert torch.equal(knn_predict(bank, labels, query, 4), knn_predict(bank, labels, query, 4, k=20, temperature=0.07))


def test_the_pretraining_monitor_knn_accuracy_and_knn_top1_score_with_dinos_k_and_temperature(monkeypatch):
    """``pretrain --knn-every`` builds its KnnMonitor without k or temperature: the score it prints is DINO's k-NN."""
    bank, labels, query = _bank()
    loader = DataLoader(TensorDataset(torch.zeros(1, 3, 8, 8), torch.zeros(1, dtype=torch.long)))
    monkeypatch.setattr(knn, "knn_loaders", lambda *args, **kwargs: (loader, loader))
    features = iter([(bank, labels), (query, labels[:9])] * 2)
    monkeypatch.setattr(knn, "extract_features", lambda *args, **kwargs: next(features))
    asked, predict = [], knn.knn_predict
    monkeypatch.setattr(knn, "knn_predict", lambda *args, **kwargs: asked.append(args[4:6]) or predict(*args, **kwargs))
    monitor = KnnMonitor("unused", img_size=8)
    assert 0 <= monitor(encoder=None) <= 1
    assert 0 <= knn.knn_accuracy(None, loader, loader) <= 1
    assert 0 <= knn.knn_top1(bank, labels, query, labels[:9]) <= 1
    assert asked == [(20, 0.07)] * 3


def test_a_zero_feature_row_scores_as_f_normalize_leaves_it_a_zero_similarity():
    """F.normalize divides by max(norm, 1e-12): a zero row has similarity 0 to every query, not 0/0 = NaN (which topk
    would rank first, making every score NaN)."""
    bank, labels, query = _bank(rows=12)
    bank[3] = 0
    scores = knn_predict(bank, labels, query, 4, k=12, temperature=0.1)
    sim = F.normalize(query, dim=1) @ F.normalize(bank, dim=1).T
    expected = torch.zeros(9, 4).scatter_add_(1, labels.expand(9, -1), ((sim - sim.amax(1, keepdim=True)) / 0.1).exp())
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores, expected)


def test_a_bank_and_queries_below_float32_score_as_their_float32_values():
    """bf16 features (a bf16 run's, saved) are scored in float32: their norms in bf16 would move the similarities."""
    bank, labels, query = _bank()
    bank, query = bank.bfloat16(), query.bfloat16()
    as_float32 = knn_predict(bank.float(), labels, query.float(), 4, k=7)
    assert torch.equal(knn_predict(bank, labels, query, 4, k=7), as_float32)


def test_the_pretraining_monitor_reads_and_scores_as_it_was_told(monkeypatch):
    """``pretrain --knn-every`` passes the run's image size, workers (with their stop-signal initialiser) and
    ``--knn-decode``: each reaches the loaders (at knn_loaders' own defaults, 224 px and full decoding, a 32-px run's
    k-NN would score other images than it trains on); a monitor's own k and temperature reach the score."""
    told, scored = [], []
    monkeypatch.setattr(knn, "knn_loaders", lambda root, **kwargs: told.append((root, kwargs)) or ("train", "val"))
    monkeypatch.setattr(knn, "knn_accuracy", lambda *args, **kwargs: scored.append((args, kwargs)) or 0.5)
    monitor = KnnMonitor("root", img_size=40, batch_size=3, workers=1, k=5, temperature=0.2, worker_init_fn=print,
                         decode="draft")
    assert told == [("root", dict(img_size=40, batch_size=3, workers=1, worker_init_fn=print, decode="draft",
                                  warn=True))]
    assert monitor("encoder", device="meta") == 0.5
    assert scored == [(("encoder", "train", "val"), dict(k=5, temperature=0.2, device="meta", small=ANY))]


def test_knn_top1_is_its_hits_over_the_queries_in_one_division():
    """3 of 10 is 0.3, as `lomar knn --json` and knn.jsonl hold it; float32's mean of hits gives 0.30000001192092896."""
    bank, labels = torch.eye(2), torch.tensor([0, 1])
    queries = torch.tensor([[1.0, 0.1]]).expand(10, 2)  # nearest class 0, all ten
    assert knn.knn_top1(bank, labels, queries, torch.tensor([0] * 3 + [1] * 7), k=1) == 0.3
