"""`crmhooks` (cli.main) with [kafka] settings laid over the config file's, for tests
of settings the file loader of this branch does not read yet (security, codec).

    python -m tests.kafka_run '{"security_protocol": "SASL_SSL", ...}' run --config F

With CRMHOOKS_TEST_NO_CODECS=1 the process has no compression library (cramjam):
aiokafka then cannot decode lz4, snappy or zstd batches, as on an install without
them (what a batch the consumer cannot decode does, tests/test_kafka_codecs.py).
"""

from __future__ import annotations

import dataclasses
import os
import sys

if os.environ.get("CRMHOOKS_TEST_NO_CODECS") == "1":
    sys.modules["cramjam"] = None  # type: ignore[assignment]  # import fails: no codecs

import orjson

from crmhooks import cli
from crmhooks.config import Config


def main() -> int:
    overrides = orjson.loads(sys.argv[1])
    load = cli._load

    def load_with_kafka(path: str) -> Config:
        config = load(path)
        return dataclasses.replace(config, kafka=dataclasses.replace(config.kafka, **overrides))

    cli._load = load_with_kafka
    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
