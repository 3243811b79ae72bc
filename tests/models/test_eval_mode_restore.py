import pytest
import torch

from lomar.models.modes import eval_mode


def _model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2), torch.nn.Dropout(0.5))
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model
    return model


def test_each_module_gets_back_the_mode_it_had():
    model = _model()
    with eval_mode(model):
        assert not any(module.training for module in model.modules())
    assert [module.training for module in model.modules()] == [True, True, False, True]


def test_each_module_gets_back_the_mode_it_had_when_the_block_raises():
    model = _model()
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("evaluation failed")
    assert [module.training for module in model.modules()] == [True, True, False, True]


def test_a_model_in_eval_mode_stays_in_eval_mode():
    model = _model().eval()
    with eval_mode(model):
        pass
    assert not any(module.training for module in model.modules())
