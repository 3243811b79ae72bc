"""k-NN and the linear probe on given features: k-NN's scores (by blocks within a byte budget, on CUDA only where the
bank fits, with no normalised copy of the bank, finite at a small temperature) and a probe that separates separable
features."""

import pytest
import torch
from downstream_models import VIT
from torch.utils.data import DataLoader, TensorDataset

from lomar import VisionTransformer, ViTConfig
from lomar.eval import knn
from lomar.eval.knn import knn_accuracy, knn_predict
from lomar.eval.linear_probe import train_linear_probe


def test_knn_on_hand_made_features():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.7, 0.7]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    query = torch.tensor([[2.0, 0.1], [0.05, 1.0]])  # scale must not matter (cosine)
    scores = knn_predict(bank, labels, query, 3, k=3, temperature=0.07, chunk=1)
    assert scores.argmax(1).tolist() == [0, 1]
    # exact votes: sum over the 3 nearest of exp(cos / T), by class, over the nearest one's exp(cos / T)
    unit = torch.nn.functional.normalize(bank, dim=1)
    sims = torch.nn.functional.normalize(query, dim=1) @ unit.T
    for row in range(2):
        top = sims[row].topk(3)
        expected = torch.zeros(3).index_add_(0, labels[top.indices], (top.values / 0.07).exp())
        expected /= (top.values[0] / 0.07).exp()
        torch.testing.assert_close(scores[row], expected)
    assert scores[0, 2] > 0 and scores[0, 1] == 0  # class 2 (diagonal) is a neighbour, class 1 is not
    # k larger than the bank: every item votes
    assert knn_predict(bank, labels, query, 3, k=50).gt(0).all()


def test_knn_scores_blocks_of_queries_within_the_byte_budget_with_the_same_scores(monkeypatch):
    """A byte budget sets how many queries a block holds (a fixed 1,024 would hold 5.2 GB of similarities against
    ImageNet's 1.28M features), and every query's row is still scored whole: ties at the k-th neighbour fall the
    same way."""
    from types import SimpleNamespace

    import lomar.eval.knn as knn

    gen = torch.Generator().manual_seed(0)
    # unit vectors of +-0.5: every cosine is exact whatever the matrix product's blocking (BLAS computes a block of
    # fewer than 8 rows in another order), and 16 vectors among 50 rows of 7 classes tie at the 5th neighbour
    bank = torch.randint(0, 2, (50, 4), generator=gen) - 0.5
    labels = torch.randint(0, 7, (50,), generator=gen)
    query = torch.randint(0, 2, (10, 4), generator=gen) - 0.5
    whole = knn_predict(bank, labels, query, 7, k=5, chunk=10)
    rows, normalize = [], knn.F.normalize
    spy = SimpleNamespace(normalize=lambda x, dim: rows.append(len(x)) or normalize(x, dim=dim))
    monkeypatch.setattr(knn, "F", spy)
    blocked = knn_predict(bank, labels, query, 7, k=5, max_bytes=4 * 50 * 3)  # 3 rows of 50 float32 similarities
    assert rows == [3, 3, 3, 1]  # the query blocks (the bank is divided by its norms block by block)
    assert torch.equal(blocked, whole)


def test_knn_scores_on_a_cuda_device_only_where_the_bank_fits_beside_a_block(monkeypatch, caplog):
    bank = torch.zeros(1000, 64)  # 256 kB of bank, its norms and a normalised block (the whole bank) beside 1 GiB
    need = 4 * (2 * 1000 * 64 + 1000) + knn.SIMILARITY_BYTES
    # a training run's allocator cache (reserved, unused: 3 bytes here) counts as free for the bank
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 5)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (need - 3, 80 * 2**30))
    assert knn.scoring_device(bank, "cuda:1") == torch.device("cuda:1")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (need - 4, 80 * 2**30))
    assert knn.scoring_device(bank, "cuda:1") == torch.device("cpu")
    assert "k-NN scores on the CPU: cuda:1 has 1.0 GiB free, the bank of 1000 features needs 1.0 GiB" in caplog.text
    assert knn.scoring_device(bank, "cpu") == torch.device("cpu")
    # ImageNet-scale banks need no room for a normalised copy (586 MiB here), only for a block of 2 x 10,922 rows
    big, block = torch.empty(200_000, 768, device="meta"), 2 * (knn.BANK_BLOCK_BYTES // (4 * 768))
    need = 4 * (200_000 * 769 + block * 768) + knn.SIMILARITY_BYTES
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (need - 3, 80 * 2**30))
    assert knn.scoring_device(big, "cuda:1") == torch.device("cuda:1")


def _knn_before_blocks(bank, labels, query, classes, k, chunk):
    """knn_predict computed with a whole normalised copy of the bank: the reference the blocks must match."""
    unit, scores = torch.nn.functional.normalize(bank, dim=1), []
    for start in range(0, len(query), chunk):
        sim, idx = (torch.nn.functional.normalize(query[start:start + chunk], dim=1) @ unit.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), classes).scatter_add_(1, labels[idx], ((sim - sim[:, :1]) / 0.07).exp())
        scores.append(votes)
    return torch.cat(scores)


@pytest.mark.parametrize("rows", [64, 100, 128, 300])
def test_knn_normalises_the_bank_by_blocks_bit_for_bit(monkeypatch, rows):
    """Blocks of bank rows divided by F.normalize's denominators give its similarities bit for bit: ties at the
    k-th neighbour (rows repeated, and scaled by 2, under other labels) fall as with the whole normalised bank."""
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(300, 48, generator=gen)
    bank[100:150], bank[150:200] = bank[:50], 2 * bank[:50]  # each of the first 50 rows, three times
    labels = torch.randint(0, 9, (300,), generator=gen)
    query = torch.cat([bank[:20] + 0.01 * torch.randn(20, 48, generator=gen), torch.randn(20, 48, generator=gen)])
    monkeypatch.setattr(knn, "BANK_BLOCK_BYTES", 4 * 48 * rows, raising=False)
    unit, q = torch.nn.functional.normalize(bank, dim=1), torch.nn.functional.normalize(query, dim=1)
    norms = bank.norm(2.0, 1, keepdim=True).clamp_min(1e-12)
    assert torch.equal(knn._similarities(q, bank, norms, rows), q @ unit.T)
    for k, chunk in ((2, 16), (3, 40), (20, 7)):  # k = 2, 3: the 2nd and 3rd copy tie with the 1st
        whole = _knn_before_blocks(bank, labels, query, 9, k, chunk)
        assert torch.equal(knn_predict(bank, labels, query, 9, k=k, chunk=chunk), whole)


def test_knn_holds_no_normalised_copy_of_the_bank(monkeypatch):
    """A whole normalised copy of the bank would be a second bank beside it (3.9 GB at ImageNet's ViT-B): the
    largest tensor k-NN scoring makes is a block of it or the queries' similarities."""
    from torch.utils import _pytree
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        made = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            given = {t.untyped_storage().data_ptr() for t in _pytree.tree_leaves((args, kwargs))
                     if isinstance(t, torch.Tensor)}
            for t in _pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                    self.made = max(self.made, t.untyped_storage().nbytes())
            return out

    bank, labels = torch.randn(2000, 256), torch.randint(0, 5, (2000,))
    monkeypatch.setattr(knn, "BANK_BLOCK_BYTES", 4 * 256 * 128, raising=False)  # blocks of 128 rows (128 kB)
    with Largest() as largest:
        knn_predict(bank, labels, torch.randn(8, 256), 5, k=10)
    # the largest: room for the last block, which takes the remainder (up to 2 x 128 rows); the bank is 2,000
    assert largest.made <= 4 * 256 * 256, f"{largest.made} bytes in one tensor; the bank is {bank.nbytes}"


@pytest.mark.parametrize("temperature", [0.005, 1e-4])
def test_knn_votes_stay_finite_at_a_small_temperature(temperature):
    """exp(cos / T) overflows float32 past cos / T = 88: the nearer class must still win, not the first of two infs."""
    bank = torch.tensor([[1.0, 0.3], [1.0, 0.31], [0.3, 1.0], [0.31, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[0.9, 1.0]])  # cos 0.90 to class 1, 0.85 to class 0
    scores = knn_predict(bank, labels, query, 2, k=4, temperature=temperature)
    assert torch.isfinite(scores).all() and scores.argmax(1).tolist() == [1]


def test_knn_accuracy_on_loaders_and_restores_mode():
    torch.manual_seed(0)
    encoder = VisionTransformer(ViTConfig(**VIT)).train()
    images = torch.cat([torch.full((8, 3, 32, 32), -1.0), torch.full((8, 3, 32, 32), 1.0)])
    images += 0.1 * torch.randn_like(images)
    labels = torch.tensor([0] * 8 + [1] * 8)
    train = DataLoader(TensorDataset(images[::2], labels[::2]), batch_size=3)
    val = DataLoader(TensorDataset(images[1::2], labels[1::2]), batch_size=5)
    assert knn_accuracy(encoder, train, val, k=3) == 1.0
    assert encoder.training
    assert 0 <= knn_accuracy(encoder, train, val, k=3, pool="cls") <= 1


def test_linear_probe_separates_separable_features():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=gen) * 3
    y = torch.randint(0, 4, (300,), generator=gen)
    x = (centres[y] + torch.randn(300, 8, generator=gen)) * 5 + 3  # BatchNorm removes scale and offset
    probe, acc = train_linear_probe(x[:200], y[:200], x[200:], y[200:], epochs=40, batch_size=64, lr=0.05)
    assert acc > 0.9 and not probe.training
    assert not any(p.requires_grad for p in probe.norm.parameters())  # no affine BatchNorm
