import copy
import math
import subprocess
import sys

import pydantic
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from squeeze.model import zoo
from squeeze.model.zoo.digits_cnn import digits_cnn
from squeeze.data import digits_splits
from squeeze.errors import DataError, SqueezeError
from squeeze.export.onnx import export_onnx
from squeeze.model.loading import load_model
from squeeze.train import (
    EvalResult,
    FineTuneConfig,
    cosine_lr,
    distillation_loss,
    evaluate,
    evaluate_onnx,
    fine_tune,
)


@pytest.fixture(scope="module")
def digits():
    return digits_splits()


@pytest.fixture(scope="module")
def trained():
    """The zoo's trained digits-cnn (trained once per test run into the run's cache)."""
    return zoo.create_model("digits-cnn")


def _small_student(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return digits_cnn(width=0.25).eval()


def _states_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ---------------------------------------------------------------------------------------------------
# Config and schedule.


def test_config_defaults_and_validation():
    config = FineTuneConfig()
    assert (config.epochs, config.iterations, config.optimizer) == (1, None, "sgd")
    assert FineTuneConfig(iterations=5).epochs is None
    with pytest.raises(pydantic.ValidationError, match="exactly one"):
        FineTuneConfig(epochs=1, iterations=5)
    with pytest.raises(pydantic.ValidationError, match="extra"):
        FineTuneConfig(learning_rate=0.1)
    with pytest.raises(pydantic.ValidationError, match="nesterov"):
        FineTuneConfig(nesterov=True, momentum=0.0)
    with pytest.raises(pydantic.ValidationError, match="warmup_iterations"):
        FineTuneConfig(iterations=10, warmup_iterations=10)
    # Recipes carry it as plain data.
    assert FineTuneConfig.model_validate(config.model_dump()) == config


def test_config_module_imports_no_torch():
    code = "import sys, squeeze.train.config; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cosine_schedule_with_warmup():
    lrs = [cosine_lr(step, total=10, warmup=3, peak=1.0, floor=0.1) for step in range(10)]
    assert lrs[:3] == pytest.approx([0.25, 0.5, 0.75])  # linear ramp, never 0
    assert lrs[3] == pytest.approx(1.0)  # peak right after the warm-up
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:]))  # then strictly decreasing
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 6 / 7)))
    assert cosine_lr(10, total=10, warmup=3, peak=1.0, floor=0.1) == pytest.approx(0.1)
    # No warm-up: the plain cosine of torch's CosineAnnealingLR.
    assert cosine_lr(5, total=20, warmup=0, peak=2.0) == pytest.approx(1.0 + math.cos(math.pi / 4))


# ---------------------------------------------------------------------------------------------------
# Losses.


def test_distillation_loss_mixes_ce_and_kl():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    targets = torch.randint(0, 10, (8,), generator=g)
    ce = F.cross_entropy(student, targets)
    assert torch.equal(distillation_loss(student, None, targets, alpha=0.7, temperature=4.0), ce)
    # The teacher agreeing with the student leaves only the weighted cross-entropy.
    same = distillation_loss(student, student.clone(), targets, alpha=0.7, temperature=4.0)
    torch.testing.assert_close(same, 0.3 * ce)
    t = 2.0
    kl = (F.softmax(teacher / t, 1) * (F.log_softmax(teacher / t, 1) - F.log_softmax(student / t, 1))).sum(1).mean()
    mixed = distillation_loss(student, teacher, targets, alpha=0.25, temperature=t)
    torch.testing.assert_close(mixed, 0.75 * ce + 0.25 * t * t * kl)
    smoothed = distillation_loss(student, None, targets, alpha=0.5, temperature=1.0, label_smoothing=0.1)
    torch.testing.assert_close(smoothed, F.cross_entropy(student, targets, label_smoothing=0.1))


# ---------------------------------------------------------------------------------------------------
# Evaluation.


class _FixedLogits(nn.Module):
    """Returns preset logits row by row, whatever the input (which only carries the row index)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 0].long()]


def test_evaluate_counts_top1_top5_and_loss():
    # 6 classes; the label's rank among the logits is 0, 1, 4, 5 for the four samples.
    logits = torch.tensor([
        [9.0, 1, 2, 3, 4, 5],
        [5.0, 9, 1, 2, 3, 4],
        [1.0, 2, 3, 4, 5, 9],
        [1.0, 2, 3, 4, 5, 9],
    ])
    targets = torch.tensor([0, 0, 1, 0])
    dataset = TensorDataset(torch.arange(4.0)[:, None], targets)
    result = evaluate(_FixedLogits(logits), dataset, batch_size=3)
    assert result.n == 4
    assert result.top1 == 0.25 and result.top5 == 0.75
    assert result.loss == pytest.approx(float(F.cross_entropy(logits, targets)))
    three_classes = evaluate(_FixedLogits(logits[:, :3]), TensorDataset(torch.arange(4.0)[:, None], targets))
    assert three_classes.top5 is None  # top-5 is meaningless below 5 classes


def test_evaluate_restores_the_training_mode(trained, digits):
    model = copy.deepcopy(trained).train()
    evaluate(model, digits.val)
    assert model.training


def test_evaluate_rejects_labels_the_model_cannot_predict():
    logits = torch.zeros(2, 3)
    dataset = TensorDataset(torch.arange(2.0)[:, None], torch.tensor([0, 7]))
    with pytest.raises(DataError, match=r"label 7 .* 3 classes"):
        evaluate(_FixedLogits(logits), dataset)
    with pytest.raises(DataError, match="empty"):
        evaluate(_FixedLogits(logits), TensorDataset(torch.zeros(0, 1), torch.zeros(0, dtype=torch.long)))


def test_onnx_and_torch_evaluation_agree(trained, digits):
    artifact = export_onnx(load_model("zoo:digits-cnn"))
    torch_result = evaluate(trained, digits.test)
    onnx_result = evaluate_onnx(artifact, digits.test, batch_size=100)  # 360 = 3 x 100 + a short batch
    assert onnx_result.n == torch_result.n == 360
    assert abs(onnx_result.top1 - torch_result.top1) * 360 <= 1  # within one image
    assert onnx_result.top5 == pytest.approx(torch_result.top5, abs=1 / 360)
    assert onnx_result.loss == pytest.approx(torch_result.loss, rel=1e-3, abs=1e-4)
    assert torch_result.top1 >= 0.97
    assert evaluate_onnx(str(artifact.path), digits.test, batch_size=100) == onnx_result  # a path works too


def test_evaluate_onnx_feeds_a_fixed_batch_model(tmp_path, digits):
    model = _small_student()
    path = tmp_path / "fixed.onnx"
    # The legacy exporter without dynamic axes: the file only accepts batches of exactly 8.
    torch.onnx.export(model, (torch.zeros(8, 1, 16, 16),), str(path), dynamo=False, input_names=["x"])
    subset = TensorDataset(*(t[:21] for t in digits.val.tensors))  # 2 full batches + 5 padded
    onnx_result = evaluate_onnx(path, subset, batch_size=64)
    torch_result = evaluate(model, subset)
    assert onnx_result.n == 21
    assert onnx_result.top1 == torch_result.top1
    assert onnx_result.loss == pytest.approx(torch_result.loss, rel=1e-4)


# ---------------------------------------------------------------------------------------------------
# Fine-tuning.


def test_fine_tune_recovers_a_perturbed_model(trained, digits):
    model = copy.deepcopy(trained)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:  # conv and linear weights: noise at half their spread
                p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.5)
    before = evaluate(model, digits.val).top1
    config = FineTuneConfig(optimizer="sgd", lr=0.02, nesterov=True, iterations=40)
    result = fine_tune(model, digits.train, config, val_ds=digits.val, progress=False)
    assert before < 0.8
    assert result.val_top1 >= 0.95 and result.val_top1 >= before + 0.15
    assert not model.training
    assert result.val == evaluate(model, digits.val)
    assert sum(result.losses[-5:]) < sum(result.losses[:5])


def test_iteration_budget_runs_exactly_that_many_steps(digits):
    model = _small_student()
    forwards = []
    model.register_forward_hook(lambda module, args, out: forwards.append(module.training))
    # 1077 samples at batch 64 = 17 batches per epoch: 23 steps cross into a second, reshuffled epoch.
    config = FineTuneConfig(iterations=23, warmup_iterations=3, lr=0.05, min_lr=0.001)
    result = fine_tune(model, digits.train, config, progress=False)
    assert forwards.count(True) == 23 and result.iterations == 23
    assert len(result.losses) == len(result.lrs) == 23
    assert result.epochs == pytest.approx(23 / 17)
    assert result.lrs[3] == pytest.approx(0.05) and result.lrs[0] < result.lrs[1] < result.lrs[3]
    assert result.val is None


def test_epoch_budget_counts_batches(digits):
    subset = TensorDataset(*(t[:130] for t in digits.train.tensors))  # 3 batches of 64, 64, 2
    result = fine_tune(_small_student(), subset, FineTuneConfig(epochs=2), progress=False)
    assert result.iterations == 6 and result.epochs == 2.0


def test_same_seed_same_weights_other_seed_other_weights(digits):
    start = _small_student()

    def run(seed: int) -> nn.Module:
        model = copy.deepcopy(start)
        fine_tune(model, digits.train, FineTuneConfig(iterations=8, seed=seed, lr=0.05), progress=False)
        return model

    rng_before = torch.random.get_rng_state()
    first, again, other = run(0), run(0), run(1)
    assert _states_equal(first, again)
    assert not _states_equal(first, other)
    assert not _states_equal(first, start)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is untouched


def test_distillation_teaches_a_fresh_student(trained, digits):
    # Labels shuffled: with alpha=1 the labels do not count, so everything learned comes from the teacher.
    x, y = digits.train.tensors
    wrong = TensorDataset(x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))])
    config = FineTuneConfig(optimizer="adamw", lr=3e-3, iterations=60, distill_alpha=1.0, distill_temperature=4.0)
    student = _small_student()
    before = evaluate(student, digits.val).top1
    trained.train()  # the teacher's mode is restored afterwards
    result = fine_tune(student, wrong, config, teacher=trained, val_ds=digits.val, progress=False)
    assert trained.training
    trained.eval()
    assert before < 0.2
    assert result.val_top1 >= 0.6

    # The same run without the teacher learns nothing from the shuffled labels.
    alone = fine_tune(_small_student(), wrong, config.model_copy(update={"distill_alpha": 0.0}),
                      val_ds=digits.val, progress=False)
    assert alone.val_top1 < 0.3


def test_teacher_with_other_classes_is_refused(digits):
    teacher = digits_cnn(num_classes=7).eval()
    with pytest.raises(SqueezeError, match="same classes"):
        fine_tune(_small_student(), digits.train, FineTuneConfig(iterations=1), teacher=teacher, progress=False)


def test_diverging_loss_stops_with_a_clear_error(digits):
    config = FineTuneConfig(iterations=20, lr=1e6, momentum=0.0)
    with pytest.raises(SqueezeError, match="loss became"):
        fine_tune(_small_student(), digits.train, config, progress=False)


def test_progress_bar_is_quiet_without_a_terminal(digits, capsys):
    fine_tune(_small_student(), digits.train, FineTuneConfig(iterations=2), progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_eval_result_serializes():
    assert EvalResult(top1=0.5, loss=1.0, n=2).to_json() == {"top1": 0.5, "loss": 1.0, "n": 2, "top5": None}
