"""`crmhooks` (cli.main) in a process without the compression library (cramjam):
aiokafka then cannot decode lz4, snappy or zstd batches, as on an install without
them (tests/test_kafka_codecs.py: what a batch the consumer cannot decode does).

    python -m tests.no_codecs run --config F
"""

from __future__ import annotations

import sys

sys.modules["cramjam"] = None  # type: ignore[assignment]  # its import fails: no codecs

from crmhooks import cli  # noqa: E402  (after the codecs are gone)

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
