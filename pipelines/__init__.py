"""Prefect flows (one per stage, plus the parent DAG) and the ``goldiclip`` CLI.

Prefect's ephemeral API server needs 20-25 s to migrate a fresh database on a
small machine, past its default 20 s start-up timeout; these defaults apply
before Prefect is imported and can be overridden from the environment.
"""

import os

for _name, _value in {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
}.items():
    os.environ.setdefault(_name, _value)
