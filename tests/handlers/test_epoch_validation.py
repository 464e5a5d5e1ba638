"""Validation and report settings: the epochs EpochValidation validates, what the handlers after it see on the others,
and the class weights the report prints."""

import pytest
from ignite.engine import Engine, Events
from monai.engines import Evaluator

from medsegdiff_monai.handlers import EpochReport, EpochValidation, validation_score


class EpochNumberEvaluator(Evaluator):
    """Reports the trainer epoch it validated as its Dice."""

    def __init__(self) -> None:
        super().__init__(device="cpu", val_data_loader=[0], epoch_length=1)
        self.add_event_handler(Events.EPOCH_COMPLETED, self._score)

    def _iteration(self, engine, batchdata):
        return {}

    def _score(self, engine: Engine) -> None:
        engine.state.metrics = {"Dice": float(engine.state.epoch)}


@pytest.mark.parametrize(("interval", "validated"), [(1, [1, 2, 3, 4, 5]), (2, [2, 4, 5]), (3, [3, 5]), (7, [5])])
def test_every_interval_epochs_and_the_last_one_and_nothing_stale_between(interval, validated):
    evaluator = EpochNumberEvaluator()
    trainer = Engine(lambda engine, batch: None)
    EpochValidation(interval, evaluator).attach(trainer)
    seen = {}

    @trainer.on(Events.EPOCH_COMPLETED)
    def record(engine: Engine) -> None:  # after the validation, as EpochReport and the checkpoint saver are
        seen[engine.state.epoch] = dict(evaluator.state.metrics)

    trainer.run([0], max_epochs=5)
    assert [epoch for epoch, metrics in seen.items() if metrics] == validated
    assert all(seen[epoch] == {"Dice": float(epoch)} for epoch in validated)
    assert all(validation_score(seen[epoch]) == float("-inf") for epoch in seen if epoch not in validated)


def test_interval_below_one_is_refused_by_name():
    with pytest.raises(ValueError, match="val_interval must be >= 1"):
        EpochValidation(0, EpochNumberEvaluator())


@pytest.mark.parametrize("alpha", [[1.0], [1.0, 2.0, 3.0]])
def test_class_weights_of_another_length_are_refused_when_the_report_is_built(tmp_path, alpha):
    """``--class_weights "[1.0]"`` failed with an IndexError once the engine started; the report that prints the
    two weights refuses it by its bundle name when it is built."""
    with pytest.raises(ValueError, match=r"class_weights must be two weights, \[alpha_LGG, alpha_HGG\]"):
        EpochReport(tmp_path, alpha=alpha)
