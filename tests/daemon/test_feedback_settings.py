"""CLEAR_FEEDBACK_TOPIC: unset or empty, no feedback; a topic name otherwise, distinct from the
daemon's other topics."""

from __future__ import annotations

import pytest

from clearbudget.daemon.settings import SettingsError, load_settings


def test_feedback_is_off_by_default_and_when_empty() -> None:
    assert load_settings({}, env_file=None).feedback_topic is None
    assert load_settings({"CLEAR_FEEDBACK_TOPIC": " "}, env_file=None).feedback_topic is None
    on = load_settings({"CLEAR_FEEDBACK_TOPIC": "clear.feedback"}, env_file=None)
    assert on.feedback_topic == "clear.feedback"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CLEAR_FEEDBACK_TOPIC": "no spaces"}, "CLEAR_FEEDBACK_TOPIC: 'no spaces' is not"),
        ({"CLEAR_FEEDBACK_TOPIC": "clear.queries"},
         "CLEAR_FEEDBACK_TOPIC and CLEAR_INPUT_TOPIC are both 'clear.queries'"),
        ({"CLEAR_FEEDBACK_TOPIC": "clear.dlq"}, "CLEAR_FEEDBACK_TOPIC and CLEAR_DLQ_TOPIC"),
    ],
)  # fmt: skip
def test_a_bad_feedback_topic_is_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace(".", r"\.")):
        load_settings(env, env_file=None)
