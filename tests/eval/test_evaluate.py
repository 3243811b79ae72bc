"""Downstream: pretrained-encoder loading, k-NN, linear probe, finetune (tiny models, CPU)."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from lomar import MAE, LoMaR, VisionTransformer, ViTConfig, export_encoder
from lomar.checkpoints.io import atomic_save, safe_load
from lomar.checkpoints.keys import lomar_to_original
from lomar.cli.app import main
from lomar.eval import knn
from lomar.eval.features import load_pretrained_encoder
from lomar.eval.knn import knn_accuracy, knn_predict
from lomar.eval.linear_probe import train_linear_probe
from lomar.train import finetune
from lomar.train.config import PretrainConfig

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
TINY = dict(model="vit_tiny_patch8", embed_dim=32, depth=2, num_heads=2, img_size=32)


def _checkpoint(path: Path, method: str) -> Path:
    """A checkpoint in the format ``lomar pretrain`` writes: {"model": ..., "config": ...}."""
    torch.manual_seed(0)
    if method == "lomar":
        model = LoMaR(ViTConfig(pos="rpe", **VIT), window_size=3, num_windows=2)
        config = PretrainConfig(method="lomar", pos="rpe", window_size=3, windows=2, mask_ratio=0.8, **TINY)
    else:
        model = MAE(ViTConfig(pos="abs", **VIT), decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
        config = PretrainConfig(method="mae", pos="abs", mask_ratio=0.75, decoder_embed_dim=16, decoder_depth=1,
                                decoder_num_heads=2, **TINY)
    with torch.no_grad():  # RPE tables start at zero: make them matter for the comparisons
        for name, p in model.named_parameters():
            if name.endswith("rpe.table"):
                p.normal_(0, 0.5)
    atomic_save({"model": model.state_dict(), "config": config.to_dict(), "step": 1}, path)
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("pre") / "last.pt", "lomar")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """ImageFolder train/ (6 per class) and val/ (3 per class): red vs blue noisy squares."""
    root = tmp_path_factory.mktemp("cls")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 3)):
        for label, colour in ((0, (200, 30, 30)), (1, (30, 30, 200))):
            d = root / split / f"class{label}"
            d.mkdir(parents=True)
            for i in range(count):
                img = np.clip(np.array(colour) + rng.normal(0, 20, (36, 36, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


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
    """A fixed 1,024 queries a block held 5.2 GB of similarities against ImageNet's 1.28M features; a byte budget
    sets the block, and every query's row is still scored whole: ties at the k-th neighbour fall the same way."""
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
    """knn_predict as it was with a whole normalised copy of the bank: the reference the blocks must match."""
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
    """The whole normalised bank was a second bank beside it (3.9 GB at ImageNet's ViT-B): the largest tensor
    k-NN scoring makes is now a block of it or the queries' similarities."""
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


def test_a_finetuned_head_is_kept_only_for_the_classes_it_was_trained_on(tmp_path, capsys):
    """Row i of a head is its i-th class: a finetuned head over as many classes under other names starts afresh (the
    encoder and fc_norm kept), as --resume refuses other classes; the same classes, or none named, keep it."""
    torch.manual_seed(0)
    classifier = VisionTransformer(ViTConfig(**VIT), num_classes=3)
    atomic_save({"model": classifier.state_dict(), "config": classifier.config.to_dict(), "num_classes": 3,
                 "classes": ["cat", "dog", "owl"], "format": "lomar-finetune-1", "global_pool": "avg"},
                tmp_path / "best.pt")
    for classes in (["cat", "dog", "owl"], None):
        kept = load_pretrained_encoder(tmp_path / "best.pt", num_classes=3, classes=classes)
        assert torch.equal(kept.head.weight, classifier.head.weight) and kept.load_report.fresh == []
    other = load_pretrained_encoder(tmp_path / "best.pt", num_classes=3, classes=["ant", "bee", "cat"])
    assert not torch.equal(other.head.weight, classifier.head.weight)
    assert torch.equal(other.fc_norm.weight, classifier.fc_norm.weight)
    assert torch.equal(other.blocks[0].attn.qkv.weight, classifier.blocks[0].attn.qkv.weight)
    assert other.load_report.fresh == ["head.weight", "head.bias"]
    assert "trained on other classes (3, e.g. 'dog' is not one of the data's)" in other.load_report.summary()
    # lomar finetune names its classes: a run over other class folders starts its head afresh, and says so
    data = tmp_path / "data"
    for split in ("train", "val"):
        for name in ("ant", "bee", "cat"):
            (data / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(data / split / name / f"{i}.png")
    assert main(["finetune", "--pretrained", str(tmp_path / "best.pt"), "--data", str(data), "--img-size", "32",
                 "--batch-size", "6", "--max-steps", "1", "--workers", "0", "--device", "cpu", "--aa", "none",
                 "--out", str(tmp_path / "ft")]) == 0
    assert "so the head is initialised afresh" in capsys.readouterr().out


def test_a_finetuned_head_over_the_same_classes_in_another_order_keeps_its_rows_in_the_datas_order(tmp_path):
    """--eval-only's rule for a new finetuning from a classifier: a head saved over ['dog', 'owl', 'cat'] continued on
    folders that sort them ['cat', 'dog', 'owl'] keeps its rows (and biases), each moved to its class's index, so
    every image scores each class as the checkpoint's model did; the note says so."""
    torch.manual_seed(0)
    classifier = VisionTransformer(ViTConfig(**VIT), num_classes=3).eval()
    torch.nn.init.normal_(classifier.head.bias)  # rows told apart by their biases too
    atomic_save({"model": classifier.state_dict(), "config": classifier.config.to_dict(), "num_classes": 3,
                 "classes": ["dog", "owl", "cat"], "format": "lomar-finetune-1", "global_pool": "avg"},
                tmp_path / "best.pt")
    model = load_pretrained_encoder(tmp_path / "best.pt", num_classes=3, classes=["cat", "dog", "owl"]).eval()
    assert model.load_report.fresh == []
    assert "its head's rows put in the data's class order (the same 3 classes, saved in another order)" in (
        model.load_report.summary())
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), classifier(images)[:, [2, 0, 1]])


def test_a_finetuned_head_is_kept_only_for_the_pooling_it_was_trained_on(tmp_path):
    """A head learnt on averaged tokens (through fc_norm) scores the normed cls token otherwise, and the other way
    round: --global-pool other than the checkpoint's starts the head afresh and says so, as read_export does for
    another pooling; the same pooling keeps it."""
    torch.manual_seed(0)
    for pool, other in (("avg", "cls"), ("cls", "avg")):
        classifier = VisionTransformer(ViTConfig(**VIT), num_classes=3, global_pool=pool)
        atomic_save({"model": classifier.state_dict(), "config": classifier.config.to_dict(), "num_classes": 3,
                     "classes": ["cat", "dog", "owl"], "format": "lomar-finetune-1", "global_pool": pool},
                    tmp_path / f"{pool}.pt")
        kept = load_pretrained_encoder(tmp_path / f"{pool}.pt", num_classes=3, global_pool=pool,
                                       classes=["cat", "dog", "owl"])
        assert torch.equal(kept.head.weight, classifier.head.weight) and kept.load_report.notes == []
        fresh = load_pretrained_encoder(tmp_path / f"{pool}.pt", num_classes=3, global_pool=other)
        assert not torch.equal(fresh.head.weight, classifier.head.weight)
        assert {"head.weight", "head.bias"} <= set(fresh.load_report.fresh)
        assert (f"its head pooled by --global-pool {pool}, not {other}, so the head is initialised afresh "
                f"(--global-pool {pool} keeps it)") in fresh.load_report.summary({"global_pool": "--global-pool"})


def test_a_classifiers_saved_class_names_that_cannot_be_its_rows_are_refused_in_one_line(tmp_path):
    """A hand-made checkpoint's classes (a name that is a list, a string, a name twice) name no rows: a ValueError
    naming the file, which lomar finetune says as a usage error, not a TypeError's traceback or a silently kept
    head."""
    classifier = VisionTransformer(ViTConfig(**VIT), num_classes=3)
    for names, words in (([["owl"], "cat", "dog"], "must be a list of class names"), ("owl", "got 'owl'"),
                         (["cat", "cat", "dog"], "name 'cat' twice")):
        atomic_save({"model": classifier.state_dict(), "config": classifier.config.to_dict(), "num_classes": 3,
                     "classes": names, "format": "lomar-finetune-1", "global_pool": "avg"}, tmp_path / "best.pt")
        with pytest.raises(ValueError, match=rf"best.pt: its classes .*{re.escape(words)}"):
            load_pretrained_encoder(tmp_path / "best.pt", num_classes=3, classes=["cat", "dog", "owl"])
        assert load_pretrained_encoder(tmp_path / "best.pt").num_classes == 0  # an encoder of it needs no names


def test_a_head_over_the_same_names_in_another_unicode_form_says_so(tmp_path):
    """Saved on macOS ('cafe' + a combining accent) and read on Linux (one accented letter): the two print alike,
    so the note that drops the head names them in ASCII and the rename that would keep it."""
    classifier = VisionTransformer(ViTConfig(**VIT), num_classes=2)
    atomic_save({"model": classifier.state_dict(), "config": classifier.config.to_dict(), "num_classes": 2,
                 "classes": ["cafe\u0301", "dog"], "format": "lomar-finetune-1", "global_pool": "avg"},
                tmp_path / "best.pt")
    model = load_pretrained_encoder(tmp_path / "best.pt", num_classes=2, classes=["caf\xe9", "dog"])
    assert model.load_report.fresh == ["head.weight", "head.bias"]
    assert "('cafe\\u0301' and 'caf\\xe9' are one name in two Unicode forms" in model.load_report.summary()


def test_load_pretrained_encoder_from_each_source(pretrained, tmp_path):
    ours = load_pretrained_encoder(pretrained)
    model_state = safe_load(pretrained)["model"]
    assert torch.equal(ours.blocks[0].attn.rpe.table, model_state["encoder.blocks.0.attn.rpe.table"])
    report = ours.load_report
    assert report.source == "pretrain checkpoint (lomar)" and report.fresh == []
    assert "mask_token" in report.dropped and "head.weight" in report.dropped
    export_encoder(ours, tmp_path / "exp")
    from_dir = load_pretrained_encoder(tmp_path / "exp")
    export_encoder(ours, tmp_path / "run", weights_name="encoder.safetensors")  # what a pretrain run leaves
    from_run = load_pretrained_encoder(tmp_path / "run")
    original = tmp_path / "orig.pth"
    torch.save({"model": lomar_to_original(model_state)}, original)
    from_original = load_pretrained_encoder(original)  # 4x4 grid: the 7x7 default window must not matter
    assert from_original.load_report.source == "original checkpoint (lomar)"
    x = torch.randn(2, 3, 32, 32)
    ref = ours.forward_features(x)
    for other in (from_dir, from_run, from_original):
        torch.testing.assert_close(other.forward_features(x), ref)
    with_head = load_pretrained_encoder(pretrained, num_classes=5, img_size=48, drop_path=0.1)
    assert with_head(torch.randn(1, 3, 48, 48)).shape == (1, 5)
    assert sorted(with_head.load_report.fresh) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert "newly initialised: fc_norm" in with_head.load_report.summary()
    with pytest.raises(ValueError, match="unknown encoder setting"):
        load_pretrained_encoder(pretrained, mask_ratio=0.5)
    with pytest.raises(ValueError, match="expects"):
        load_pretrained_encoder(pretrained, embed_dim=64, num_heads=2)


def test_the_same_weights_in_any_form_give_the_same_new_head_and_later_draws(pretrained, tmp_path):
    """Reading a checkpoint draws nothing from the global RNG (some formats build a model to read it), so a
    finetune from last.pt, its export or an original checkpoint starts from the same head and streams."""
    export_encoder(load_pretrained_encoder(pretrained), tmp_path / "exp")
    original = tmp_path / "orig.pth"
    torch.save({"model": lomar_to_original(safe_load(pretrained)["model"])}, original)
    heads, draws = [], []
    for source in (pretrained, tmp_path / "exp", original):
        torch.manual_seed(0)
        heads.append(load_pretrained_encoder(source, num_classes=3).head.weight.detach())
        draws.append(torch.rand(4))
    for head, draw in zip(heads[1:], draws[1:]):
        assert torch.equal(head, heads[0]) and torch.equal(draw, draws[0])


def test_load_mae_checkpoints_and_interpolate_position(tmp_path):
    path = _checkpoint(tmp_path / "mae.pt", "mae")
    encoder = load_pretrained_encoder(path)
    assert encoder.load_report.source == "pretrain checkpoint (mae)"
    assert any(k.startswith("decoder") for k in encoder.load_report.dropped)
    x = torch.randn(1, 3, 32, 32)
    original = tmp_path / "mae_orig.pth"
    state = {k.removeprefix("encoder."): v for k, v in safe_load(path)["model"].items()}
    torch.save({"model": state}, original)
    torch.testing.assert_close(load_pretrained_encoder(original, num_heads=2).forward_features(x),
                               encoder.forward_features(x))
    bigger = load_pretrained_encoder(path, img_size=48)
    assert bigger.pos_embed.shape == (1, 1 + 36, 32) and "interpolated" in bigger.load_report.summary()
    # the same table the encoder would interpolate on the fly for a 6x6 grid
    torch.testing.assert_close(bigger.pos_embed, encoder.pos_embed_for((6, 6)))


@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_layer_decay_groups_follow_depth(pool):
    from timm.optim import param_groups_layer_decay

    model = VisionTransformer(ViTConfig(**VIT), num_classes=3, global_pool=pool)
    groups = param_groups_layer_decay(model, 0.05, model.no_weight_decay(), layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    depth = VIT["depth"]
    assert scale[id(named["patch_embed.proj.weight"])] == 0.5 ** (depth + 1)
    assert scale[id(named["cls_token"])] == 0.5 ** (depth + 1)
    for i in range(depth):
        assert scale[id(named[f"blocks.{i}.attn.qkv.weight"])] == 0.5 ** (depth - i)
    top = ("fc_norm.weight", "head.weight") if pool == "avg" else ("norm.weight", "norm.bias", "head.weight")
    assert not any(name.startswith("norm." if pool == "avg" else "fc_norm.") for name in named)
    for name in top:  # the top layer, as MAE's get_layer_id_for_vit
        assert scale[id(named[name])] == 1.0, name
    assert decay[id(named["cls_token"])] == 0 and decay[id(named["blocks.0.norm1.bias"])] == 0
    assert decay[id(named["blocks.0.attn.rpe.table"])] == 0.05 and decay[id(named["head.weight"])] == 0.05


def test_a_trained_absolute_position_table_is_in_the_stem_and_not_decayed():
    # MAE's finetuning: get_layer_id_for_vit puts pos_embed in layer 0 with cls_token, no_weight_decay skips both
    from types import SimpleNamespace

    model = VisionTransformer(ViTConfig(**VIT, pos="abs"), num_classes=3)
    config = SimpleNamespace(decay_rel_pos_bias=True, weight_decay=0.05, layer_decay=0.5)
    groups = finetune.FinetuneTask.param_groups(SimpleNamespace(model=model, config=config))
    (group,) = [g for g in groups if any(p is model.pos_embed for p in g["params"])]
    assert group["lr_scale"] == 0.5 ** (VIT["depth"] + 1) and group["weight_decay"] == 0.0


def test_knn_and_linprobe_commands(pretrained, folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "knn.json"
    common = ["--data", str(folder), "--img-size", "32", "--workers", "0", "--device", "cpu"]
    devices, score = [], knn.knn_top1  # the scoring runs on --device (it ran on the CPU whatever the flag said)
    monkeypatch.setattr(knn, "knn_top1", lambda *args, **kw: devices.append(kw.get("device")) or score(*args, **kw))
    assert main(["knn", str(pretrained), *common, "--k", "3", "--json", str(out)]) == 0
    assert devices == ["cpu"]
    result = json.loads(out.read_text())
    assert 0 <= result["knn_top1"] <= 1 and result["val_images"] == {"scored": 6, "skipped": 0}
    assert main(["linprobe", str(pretrained), *common, "--epochs", "5", "--save", str(tmp_path / "p.pt")]) == 0
    captured = capsys.readouterr()
    assert "k-NN (k=3" in captured.out and "linear probe" in captured.out and "loaded" in captured.err
    assert "linear.weight" in safe_load(tmp_path / "p.pt")["probe"]


def test_a_linear_probe_that_diverges_is_an_error_naming_the_flag_not_a_score(pretrained, tmp_path, capsys):
    # NaN logits still gave an argmax: the run printed a top-1 (the share of class 0) and exited 0
    rng = np.random.default_rng(0)
    for split in ("train", "val"):  # classes of the same noise: no probe separates them, LARS's steps grow on
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(4):
                noise = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(noise).save(tmp_path / split / label / f"{i}.png")
    common = ["--data", str(tmp_path), "--img-size", "32", "--workers", "0", "--device", "cpu", "--epochs", "20",
              "--probe-batch-size", "4", "--protocol", "mae", "--warmup-epochs", "0"]
    assert main(["linprobe", str(pretrained), *common, "--blr", "1e37"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == ("lomar linprobe: error: the linear probe diverged: its weights "
                                                        "hold NaN or inf after 20 epochs; lower --blr (now 1e+37)")


@pytest.mark.parametrize("split", ["train", "val"])
def test_knn_takes_train_or_val_in_place_of_the_data_roots_split(pretrained, folder, tmp_path, split, capsys):
    other = tmp_path / split
    shutil.copytree(folder / split / "class0", other / "class0")
    shutil.copytree(folder / split / "class0", other / "extra")
    code = main(["knn", str(pretrained), "--data", str(folder), f"--{split}", str(other), "--img-size", "32",
                 "--workers", "0", "--device", "cpu"])
    assert code == 2 and f"only in {other}: ['extra']" in capsys.readouterr().err


def test_finetune_resume_refuses_renamed_class_folders(pretrained, folder, tmp_path, capsys, monkeypatch):
    data, out = tmp_path / "data", tmp_path / "ft"
    shutil.copytree(folder, data)
    args = ["finetune", "--pretrained", str(pretrained), "--data", str(data), "--img-size", "32", "--batch-size", "4",
            "--workers", "0", "--out", str(out), "--device", "cpu", "--epochs", "2", "--max-steps", "1"]
    assert main(args) == 0
    for split in ("train", "val"):  # as many classes, so every weight still fits: labels 0 and 1 would swap
        (data / split / "class0").rename(data / split / "zebra")
    capsys.readouterr()

    def build(*args, **kwargs):  # the refusal came after the model's build and the pretrained weights' read
        raise AssertionError("the model was built")

    monkeypatch.setattr(finetune, "load_pretrained_encoder", build)
    assert main([*args[:-2], "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "only in the checkpoint: ['class0'], only in the data: ['zebra']" in err and err.count("\n") == 1


def test_finetune_evaluates_past_a_batch_of_only_unreadable_images(pretrained, folder, tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "ft"
    shutil.copytree(folder, data)
    args = ["finetune", "--pretrained", str(pretrained), "--data", str(data), "--img-size", "32", "--batch-size", "4",
            "--workers", "0", "--device", "cpu", "--epochs", "1"]
    for label in ("class0", "class1"):  # 11 a class: batches 4, 4, 4, 4, 4, 2, the last one wholly unreadable
        for i in range(8):
            shutil.copy(data / "val" / label / f"{i % 3}.png", data / "val" / label / f"x{i}.png")
    for name in ("x6.png", "x7.png"):  # 2 of 22: under the 10 % that stops a run
        (data / "val" / "class1" / name).write_bytes(b"")
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 0
    top1 = safe_load(out / "best.pt")["metrics"]["top1"]
    assert 20 * top1 == pytest.approx(round(20 * top1))  # a share of the 20 read
    note = f"{data / 'val'}: 2 unreadable image(s) skipped, at most 10% of a split"  # as knn says it
    lines = capsys.readouterr().out.splitlines()
    assert lines[lines.index(note) + 1].startswith("step 3, end of epoch 0: top-1")
    assert main(["finetune", "--eval-only", "--pretrained", str(out), "--val", str(data / "val"), "--img-size", "32",
                 "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "ev")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (f"lomar finetune: top-1 {100 * top1:.2f}% over 20 images "
                                                        f"({note}); {tmp_path / 'ev' / 'metrics.jsonl'}")
    for log in (out, tmp_path / "ev"):  # the run's record and --eval-only's hold the counts
        assert json.loads((log / "metrics.jsonl").read_text().splitlines()[-1])["val_images"] == {"scored": 20,
                                                                                                 "skipped": 2}
    for path in (data / "val").rglob("*.png"):
        path.write_bytes(b"")
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"lomar finetune: error: no image in {data / 'val'} could be read (22 tried); fix or replace them"


def test_finetune_top1_and_top5_count_every_validation_image_once_not_a_mean_of_batches():
    """Batches 4 and 3: 4 of 7 right is top-1 4/7, where a mean of the batches' accuracies would say (1 + 0) / 2."""
    import contextlib
    from types import SimpleNamespace

    from torch.utils.data import Subset

    from lomar.train.distributed import DistInfo

    logits = torch.arange(6.0).repeat(7, 1)  # every image ranks class 5 first, class 0 last
    images = TensorDataset(logits, torch.tensor([5, 5, 5, 5, 4, 3, 0]))  # the last batch: 2 of 3 in the top 5
    images.root = Path("val")
    task = SimpleNamespace(model=torch.nn.Identity(), device=torch.device("cpu"), info=DistInfo(),
                           val_loader=DataLoader(Subset(images, range(7)), batch_size=4),
                           autocast=contextlib.nullcontext, classes=list("abcdef"), train_loader=None)
    assert finetune.FinetuneTask.evaluate(task) == {"top1": pytest.approx(4 / 7), "top5": pytest.approx(6 / 7)}


def test_knn_monitor_for_the_pretraining_hook(pretrained, folder):
    from lomar.eval.knn import KnnMonitor

    monitor = KnnMonitor(folder, img_size=32, batch_size=5, workers=0, k=3)
    encoder = load_pretrained_encoder(pretrained).train()
    assert 0 <= monitor(encoder) <= 1 and encoder.training
    with pytest.raises(ValueError, match="train holds no train/ folder: expected the split's class folders there"):
        KnnMonitor(folder / "train", img_size=32)  # no train/ and val/ inside


def test_finetune_two_steps_and_resume(pretrained, folder, tmp_path, capsys):
    out = tmp_path / "ft"
    # 12 training images, batch 4: 3 steps per epoch; 48 px from a 32 px pretraining (RPE).
    args = ["finetune", "--pretrained", str(pretrained), "--data", str(folder), "--img-size", "48",
            "--batch-size", "4", "--workers", "0", "--out", str(out), "--device", "cpu", "--log-every", "1"]
    assert main([*args, "--epochs", "2", "--max-steps", "2"]) == 0
    assert (out / "last.pt").is_file() and not (out / "best.pt").exists()  # a part-done epoch is never "best"
    captured = capsys.readouterr().out
    assert "top-1" in captured and "newly initialised: fc_norm" in captured
    first = safe_load(out / "last.pt")
    assert (first["step"], first["epoch"], first["batches_done"], first["num_classes"]) == (2, 0, 2, 2)
    assert main([*args, "--epochs", "2", "--max-steps", "2"]) == 2  # refuses to clobber a run
    assert main([*args, "--epochs", "1", "--resume", "auto"]) == 0  # finishes epoch 0: one more step
    last = safe_load(out / "last.pt")
    assert (last["step"], last["epoch"], last["batches_done"]) == (3, 1, 0)
    best = safe_load(out / "best.pt")
    assert best["classes"] == ["class0", "class1"] and 0 <= best["metrics"]["top1"] <= 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert any("top1" in r for r in records) and not any("top5" in r for r in records)  # 2 classes: always 1
    # the finetuned checkpoint is itself a pretrained source (e.g. for k-NN)
    assert load_pretrained_encoder(out / "best.pt").load_report.source == "finetune checkpoint"
    capsys.readouterr()
    assert main([*args, "--epochs", "1", "--max-steps", "2", "--resume", "auto"]) == 2  # past step 3: refused unbuilt
    captured = capsys.readouterr()
    assert captured.err.startswith("lomar finetune: error: --resume: the run is at step 3, past step 2 where "
                                   "--max-steps 2 ends it") and "loaded" not in captured.out


@pytest.mark.parametrize("args, words", [
    (["--data", "/nope"], "is not a folder"),
    ([], "pass --data"),
    (["--data", "X", "--batch-size", "0"], "must be positive"),
    (["--data", "X", "--batch-size", "3"], "must be even"),
    (["--data", "X", "--resume", "/nope.pt"], "does not exist"),
])
def test_finetune_bad_flags(pretrained, args, words, capsys):
    assert main(["finetune", "--pretrained", str(pretrained), *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command, args, words", [
    ("knn", ["--data", "/nope"], "is not a folder"),
    ("knn", ["--k", "0", "--data", "X"], "--k: expected an integer >= 1"),
    ("linprobe", [], "pass --data"),
    ("linprobe", ["--epochs", "0", "--data", "X"], "--epochs: expected an integer >= 1"),
    # the other protocol's flags were ignored without a word: LARS ran without the weight decay asked for
    ("linprobe", ["--protocol", "mae", "--warmup-epochs", "1", "--weight-decay", "0.05", "--data", "X"],
     "--weight-decay is for --protocol adamw; --protocol mae does not read it: drop --weight-decay"),
    ("linprobe", ["--protocol", "mae", "--warmup-epochs", "1", "--lr", "0.1", "--data", "X"], "--lr is for --protocol"),
    ("linprobe", ["--blr", "5", "--data", "X"], "--blr is for --protocol mae; --protocol adamw does not read it"),
])
def test_probe_bad_flags(pretrained, command, args, words, capsys):
    assert main([command, str(pretrained), *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_finetune_under_torchrun_with_two_processes(pretrained, folder, tmp_path):
    """Every classifier parameter gets a gradient, so DDP's reducer does not stall (it did when the
    unused final norm was kept): a stalled rank is reported as hung."""
    from helpers import as_torchrun

    out = tmp_path / "ddp"
    ranks = as_torchrun(["finetune", "--pretrained", str(pretrained), "--data", str(folder), "--img-size", "32",
                         "--batch-size", "2", "--workers", "0", "--threads", "1", "--out", str(out), "--device", "cpu",
                         "--epochs", "1", "--max-steps", "2"], 2, tmp_path, timeout=300)
    assert [code for code, _, _ in ranks] == [0, 0], "".join(o + e for _, o, e in ranks)[-3000:]
    assert safe_load(out / "last.pt")["step"] == 2


def test_finetune_sigusr1_checkpoints_mid_epoch_and_resumes(pretrained, folder, tmp_path, capsys, monkeypatch):
    import os
    import signal

    import lomar.train.lifecycle as finetune

    real, calls = finetune.any_rank_stopping, []

    def signal_during_step_2(stop, device, work_ahead):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(stop, device, work_ahead)

    out = tmp_path / "ft"
    args = ["finetune", "--pretrained", str(pretrained), "--data", str(folder), "--img-size", "32",
            "--batch-size", "4", "--workers", "0", "--out", str(out), "--device", "cpu", "--epochs", "2"]
    before = signal.getsignal(signal.SIGUSR1)
    monkeypatch.setattr(finetune, "any_rank_stopping", signal_during_step_2)
    assert main(args) == 0
    monkeypatch.undo()
    assert "stopped by SIGUSR1 at step 2" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGUSR1) == before  # handlers given back
    ckpt = safe_load(out / "last.pt")
    assert (ckpt["step"], ckpt["epoch"], ckpt["batches_done"]) == (2, 0, 2)
    assert main([*args, "--resume", "auto"]) == 0  # the rest: 1 step of epoch 0, 3 of epoch 1
    last = safe_load(out / "last.pt")
    assert (last["step"], last["epoch"]) == (6, 2) and (out / "best.pt").is_file()


def test_knn_of_a_stopped_run_folder_reads_its_last_checkpoint(pretrained, folder, tmp_path, capsys):
    """A run stopped by a signal has last.pt but no export yet: 'a folder without config.json; pass ... a folder
    written by lomar pretrain', which it was. Its last checkpoint is read instead."""
    run = tmp_path / "stopped"
    run.mkdir()
    shutil.copy(pretrained, run / "last.pt")
    common = ["--data", str(folder), "--img-size", "32", "--workers", "0", "--device", "cpu", "--k", "3"]
    assert main(["knn", str(run), *common, "--json", str(tmp_path / "a.json")]) == 0, capsys.readouterr().err
    step = safe_load(pretrained)["step"]  # `lomar pretrain ... && lomar knn RUN` gets here after a stop (exit 0)
    said = capsys.readouterr()
    assert f"{run} holds no export, so its run has not finished: loaded its last checkpoint, saved at step {step}" \
        in said.out + said.err
    assert main(["knn", str(pretrained), *common, "--json", str(tmp_path / "b.json")]) == 0
    said = capsys.readouterr()
    assert f"saved at step {step}" in said.out + said.err and "no export" not in said.out + said.err
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads((tmp_path / "b.json").read_text())


def test_knn_and_linprobe_score_trivially_separable_classes_at_100_percent(pretrained, tmp_path, capsys):
    """Red against blue images: any encoder's features separate them, so anything below 100 % is a bug in the
    scoring (labels, pooling, the probe's training), not the model's."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 4)):
        for label, colour in (("blue", (30, 30, 220)), ("red", (220, 30, 30))):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / label / f"{i}.png")
    common = ["--data", str(tmp_path), "--img-size", "32", "--workers", "0", "--device", "cpu"]
    assert main(["knn", str(pretrained), *common, "--k", "3"]) == 0
    assert main(["linprobe", str(pretrained), *common, "--epochs", "20"]) == 0
    assert main(["linprobe", str(pretrained), *common, "--pool", "cls", "--epochs", "20"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "top-1" in ln]
    assert len(lines) == 3 and all("top-1: 100.00% (8 val / 12 train images)" in ln for ln in lines), lines
