"""The enrolment rule, case by case, with its reasons."""

from __future__ import annotations

import pytest

from agent.state.enrolment import Enrolment, enrolment

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
OPT_OUT = {"istio.io/dataplane-mode": "none"}
AGENT = {"app": "ambient-agent"}


@pytest.mark.parametrize(
    ("pod_labels", "namespace_labels", "host_network", "exclude", "expected"),
    [
        pytest.param({}, {}, False, None, Enrolment.NOT_LABELLED, id="nothing labelled"),
        pytest.param(AMBIENT, {}, False, None, Enrolment.BY_POD_LABEL, id="pod label"),
        pytest.param({}, AMBIENT, False, None, Enrolment.BY_NAMESPACE_LABEL, id="namespace label"),
        pytest.param(AMBIENT, AMBIENT, False, None, Enrolment.BY_POD_LABEL, id="both labels"),
        pytest.param(OPT_OUT, AMBIENT, False, None, Enrolment.OPTED_OUT, id="pod opts out of namespace"),
        pytest.param(OPT_OUT, {}, False, None, Enrolment.OPTED_OUT, id="opt-out alone"),
        pytest.param(
            {"istio.io/dataplane-mode": "other"},
            AMBIENT,
            False,
            None,
            Enrolment.BY_NAMESPACE_LABEL,
            id="other value",
        ),
        pytest.param(
            {}, {"istio.io/dataplane-mode": "none"}, False, None, Enrolment.NOT_LABELLED, id="ns none"
        ),
        pytest.param(AMBIENT, AMBIENT, True, None, Enrolment.HOST_NETWORK, id="host network"),
        pytest.param({**AMBIENT, **AGENT}, AMBIENT, False, AGENT, Enrolment.EXCLUDED, id="agent's own pod"),
        pytest.param(AMBIENT, AMBIENT, False, AGENT, Enrolment.BY_POD_LABEL, id="exclusion selects others"),
        pytest.param({}, AMBIENT, False, {}, Enrolment.EXCLUDED, id="empty exclusion selects all"),
    ],
)
def test_enrolment_rule(
    pod_labels: dict[str, str],
    namespace_labels: dict[str, str],
    host_network: bool,
    exclude: dict[str, str] | None,
    expected: Enrolment,
) -> None:
    result = enrolment(
        pod_labels=pod_labels, namespace_labels=namespace_labels, host_network=host_network, exclude=exclude
    )

    assert result is expected
    assert result.enrolled is (expected in (Enrolment.BY_POD_LABEL, Enrolment.BY_NAMESPACE_LABEL))


def test_reasons_read_as_sentences() -> None:
    assert Enrolment.OPTED_OUT.value == "not enrolled: the pod is labelled istio.io/dataplane-mode=none"
