"""Adapted from parsl/tests/test_htex/test_resource_spec_validation.py
(test_submit_calls_validate, test_resource_spec_validation,
test_resource_spec_validation_bad_keys, test_resource_spec_validation_one_key).

HTEX accepts only the 'priority' resource-spec key, and submit() validates
through the (overridable) validate_resource_spec method.
"""
from unittest import mock

import pytest
from parsl.executors.errors import InvalidResourceSpecification

from htex_rs import HighThroughputExecutor


def double(x):
    return x * 2


@pytest.mark.timeout(120)
def test_submit_calls_validate(tmp_path):
    # Parsl's test stubs out the outgoing task queue so submit() runs without a
    # started executor. Here the executor is real (started, no blocks) and the
    # validator is wrapped by a spy that still runs it.
    htex = HighThroughputExecutor(address="127.0.0.1", encrypted=False)
    htex.run_dir = str(tmp_path)
    htex.start()
    try:
        htex.validate_resource_spec = mock.Mock(wraps=htex.validate_resource_spec)
        res_spec = {}
        htex.submit(double, res_spec, (5,), {})
        htex.validate_resource_spec.assert_called()
    finally:
        htex.shutdown()


@pytest.mark.timeout(120)
def test_resource_spec_validation():
    htex = HighThroughputExecutor(address="127.0.0.1")
    ret_val = htex.validate_resource_spec({})
    assert ret_val is None


@pytest.mark.timeout(120)
def test_resource_spec_validation_bad_keys():
    htex = HighThroughputExecutor(address="127.0.0.1")

    with pytest.raises(InvalidResourceSpecification):
        htex.validate_resource_spec({"num_nodes": 2})


@pytest.mark.timeout(120)
def test_resource_spec_validation_one_key():
    htex = HighThroughputExecutor(address="127.0.0.1")
    ret_val = htex.validate_resource_spec({"priority": 2})
    assert ret_val is None
