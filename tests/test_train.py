"""The training loop: schedule, data order, NaN handling, auxiliary losses, a short real run."""

import math

import pytest
import torch
from torch import nn

from prewarm_gpu.data import first_batch_indices
from prewarm_gpu.models import SimpleCNN
from prewarm_gpu.train import TrainConfig, cosine_lr, curve_steps, evaluate, train


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


class Linear(nn.Module):
    """A tiny fast model: flatten → linear."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_cosine_lr_matches_torch_cosine_annealing():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50, eta_min=3e-5)
    for step in range(51):
        assert opt.param_groups[0]["lr"] == pytest.approx(cosine_lr(step, 50, 3e-3, 3e-5), rel=1e-9)
        opt.step()
        sched.step()
    assert cosine_lr(0, 50, 3e-3, 3e-5) == 3e-3 and cosine_lr(50, 50, 3e-3, 3e-5) == 3e-5
    assert cosine_lr(25, 50, 2.0, 0.0) == pytest.approx(1.0)


def test_curve_steps():
    assert curve_steps(100, 10) == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert curve_steps(5, 10) == [1, 2, 3, 4, 5]
    assert curve_steps(7, 2)[-1] == 7


def test_short_digits_training_learns_well_above_chance(digits):
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)  # the CPU generator alone
        model = SimpleCNN(1, 10, 8)
    cfg = TrainConfig(steps=60, eval_points=3, loss_points=20)
    state = torch.get_rng_state()
    r = train(model, digits, cfg, seed=42)
    assert torch.equal(state, torch.get_rng_state())  # the loop never touches global RNG
    assert r.status == "ok" and r.accuracy > 0.8, r
    assert r.acc_steps == [0, 20, 40, 60] and r.test_acc[-1] == r.accuracy
    assert r.loss_steps == list(range(3, 61, 3)) and r.loss[-1] < r.loss[0]
    assert r.steps_to_target is not None and r.steps_to_target <= 60


def test_training_sees_the_seeds_first_batch_first(digits):
    seen = []

    class Spy(Linear):
        def forward(self, x):
            if self.training:
                seen.append(x.detach().clone())
            return super().forward(x)

    train(Spy(), digits, TrainConfig(steps=2, batch_size=32, loss_points=2), seed=7)
    idx = first_batch_indices(digits.train_x.shape[0], 32, 7, "cpu")
    torch.testing.assert_close(seen[0], digits.standardise(digits.train_x[idx]), rtol=0, atol=0)


def test_nan_loss_marks_the_run_failed_at_that_step(digits):
    class Explodes(Linear):
        calls = 0

        def forward(self, x):
            out = super().forward(x)
            if self.training:
                self.calls += 1
                if self.calls == 7:
                    out = out * float("nan")
            return out

    r = train(Explodes(), digits, TrainConfig(steps=20, loss_points=4), seed=0)
    assert r.status == "failed" and r.failed_step == 7 and r.accuracy is None
    assert "step 7" in r.error
    assert r.loss_steps == [5] and all(math.isfinite(v) for v in r.loss)


def test_aux_logits_add_weighted_cross_entropy_to_the_objective_not_the_curve(digits):
    # Zero aux logits have CE = ln 10 each: the objective is main + 0.3 · 2 · ln 10, while the
    # logged curve (and steps to target) is the main head's loss alone.
    from prewarm_gpu.training.stacks import run_loss

    class WithAux(Linear):
        def forward(self, x):
            out = super().forward(x)
            self.aux_logits = [torch.zeros_like(out)] * 2 if self.training else []
            return out

    def losses(model):
        cfg = TrainConfig(steps=4, lr_start=1e-30, lr_end=0.0, loss_points=4, aux_weight=0.3)
        return torch.tensor(train(model, digits, cfg, seed=1).loss)

    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)  # the CPU generator alone
        plain = Linear()
        aux = WithAux()
    aux.load_state_dict(plain.state_dict())
    x = digits.standardise(digits.train_x[:64])
    y = digits.train_y[:64]
    total, main = run_loss(aux.train(), x, y, 0.3)
    torch.testing.assert_close(total - main, torch.tensor(0.3 * 2 * math.log(10)), rtol=0,
                               atol=1e-5)
    torch.testing.assert_close(losses(aux), losses(plain), rtol=0, atol=1e-6)


def test_evaluate_restores_the_mode(digits):
    m = Linear().train()
    acc = evaluate(m, digits)
    assert m.training and 0.0 <= acc <= 1.0
    m.eval()
    evaluate(m, digits)
    assert not m.training


def test_config_is_validated():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="learning rates"):
        TrainConfig(lr_start=0.0)
