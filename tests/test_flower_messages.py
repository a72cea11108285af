"""The Flower message schema (fedsynth.federated.flower.messages): round trips and clear refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsynth.federated.flower import messages as m
from fedsynth.federated.flower.records import encode, record_to_weights

WEIGHTS = {"generator/w": np.arange(6, dtype=np.float32).reshape(2, 3), "generator/n": np.array(3, dtype=np.int64)}


def _same_weights(record: ArrayRecord) -> None:
    back = record_to_weights(record)
    assert back.keys() == WEIGHTS.keys() and all(np.array_equal(back[k], WEIGHTS[k]) for k in WEIGHTS)


def test_a_round_instruction_survives_the_round_trip() -> None:
    from conftest import tiny_config

    config = tiny_config("gan")
    sent = m.RoundInstruction(3, json.dumps(config.to_dict()), encode(WEIGHTS, "float32"), m.Verdict(2, False, "NaN in 'generator/w'"))
    got = m.RoundInstruction.from_record(sent.to_record())
    assert (got.server_round, got.experiment, got.verdict) == (3, sent.experiment, sent.verdict)
    assert got.config().to_dict() == config.to_dict()
    _same_weights(got.arrays)
    assert m.RoundInstruction.from_record(m.RoundInstruction(1, "{}", ArrayRecord()).to_record()).verdict is None
    for verdict in (m.Verdict(7, True), m.Verdict(7, False, "site 's': 'g/w' contains NaN or Inf")):
        assert m.Verdict.parse(str(verdict)) == verdict


def test_replies_survive_the_round_trip() -> None:
    train = m.TrainReply("site1", encode(WEIGHTS, "float32"), 12, {"loss_g": 0.5, "epsilon": 1.25})
    got = m.TrainReply.from_record(train.to_record())
    assert (got.site_id, got.num_samples, dict(got.metrics)) == ("site1", 12, {"loss_g": 0.5, "epsilon": 1.25})
    _same_weights(got.arrays)
    evaluation = m.EvaluateReply("site2", 4, 0.25, {"val_loss": 0.25, m.LOSS: 9.0})  # the loss travels once, as `loss`
    back = m.EvaluateReply.from_record(evaluation.to_record())
    assert (back.site_id, back.num_samples, back.loss, dict(back.metrics)) == ("site2", 4, 0.25, {"val_loss": 0.25})
    assert back.report() == {"val_loss": 0.25, m.LOSS: 0.25}
    kept_in = m.EvaluateReply.from_record(m.EvaluateReply("site2", 4, None, {}).to_record())
    assert kept_in.loss is None and kept_in.report() == {}


def _train_content(**changes: object) -> RecordDict:
    content = m.TrainReply("site1", encode(WEIGHTS, "float32"), 12, {"loss_g": 0.5}).to_record()
    for name, record in changes.items():
        if record is None:
            del content[name]
        else:
            content[name] = record  # type: ignore[assignment]
    return content


@pytest.mark.parametrize(("content", "error"), [
    (_train_content(arrays=None), r"the train reply of node 7: no 'arrays' record \(it has \['metrics', 'site'\]\)"),
    (_train_content(metrics=MetricRecord({"loss_g": 0.5})), r"record 'metrics' has no 'num_samples'"),
    (_train_content(metrics=MetricRecord({"num_samples": -1})), r"'metrics.num_samples' is -1, expected a count >= 0"),
    (_train_content(site=ConfigRecord({"name": "site1"})), r"record 'site' has no 'site-id'"),
    (_train_content(site=ConfigRecord({"site-id": 3})), r"'site.site-id' is 3, expected str"),
    (_train_content(metrics=ConfigRecord({"num_samples": 3})), r"record 'metrics' is a ConfigRecord, expected a MetricRecord"),
    (_train_content(metrics=MetricRecord({"num_samples": 3, "curve": [0.1, 0.2]})), r"metric 'metrics.curve' is \[0.1, 0.2\]"),
])
def test_a_malformed_reply_is_refused_naming_the_key(content: RecordDict, error: str) -> None:
    with pytest.raises(m.MessageError, match=error):
        m.TrainReply.from_record(content, "the train reply of node 7")


@pytest.mark.parametrize(("config", "error"), [
    ({"experiment": "{}"}, r"record 'config' has no 'server-round'"),
    ({"server-round": 0, "experiment": "{}"}, r"'config.server-round' is 0, expected a round >= 1"),
    ({"server-round": 1, "experiment": "[1]"}, r"'config.experiment' is not the experiment config as a JSON object"),
    ({"server-round": 1, "experiment": "{}", "last-update": "fine"}, r"'config.last-update': 'fine' is not 'round N: accepted'"),
])
def test_a_malformed_instruction_is_refused_naming_the_key(config: dict[str, object], error: str) -> None:
    with pytest.raises(m.MessageError, match=error):
        m.RoundInstruction.from_record(RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord(config)}))  # type: ignore[arg-type]
