"""Config for running Parsl's own test suite (config mode) against htex_rs.

Same settings as parsl/tests/configs/htex_local.py, with htex_rs's executor and the
worker address pinned to loopback:

    PT=$(python -c 'import parsl,os;print(os.path.dirname(parsl.__file__))')/tests
    pytest "$PT" --config tests/compat/parsl_suite/htex_rs_config.py -k "not cleannet"
"""
from parsl.config import Config
from parsl.launchers import SimpleLauncher
from parsl.providers import LocalProvider

from htex_rs import HighThroughputExecutor


def fresh_config() -> Config:
    return Config(
        executors=[
            HighThroughputExecutor(
                label="htex_local",
                address="127.0.0.1",
                loopback_address="::1",
                worker_debug=True,
                cores_per_worker=1,
                encrypted=True,
                provider=LocalProvider(
                    init_blocks=1,
                    max_blocks=1,
                    launcher=SimpleLauncher(),
                ),
            )
        ],
        strategy='none',
    )


config = fresh_config()
