"""How every Kafka client crmhooks makes connects (security settings, clear errors),
and the short-lived ones: creating topics, reading a topic, producing a few records.

``client_options`` is the one place the ``[kafka]`` connection settings become
aiokafka options; every consumer, producer and admin client takes them. A client
that cannot start is explained by ``start_error``: aiokafka itself says only
"Unable to bootstrap" (the cause is in its log), so one more connection to the
first bootstrap server names the cause (refused credentials, an untrusted
certificate, a TLS listener spoken to in plain text...). The SASL password is in
no message, log line or repr.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka import errors as kafka_errors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.helpers import create_ssl_context

from crmhooks.config import KafkaSettings
from crmhooks.errors import KafkaIOError, ProduceError

log = logging.getLogger(__name__)

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
COMPRESSION_TYPES = ("none", "gzip", "snappy", "lz4", "zstd")

# The connection made to explain a client that could not start: SPEC §11 wants a
# clear error within 10 s for commands, 15 s for `run`.
EXPLAIN_TIMEOUT_S = 8.0


def client_options(settings: KafkaSettings) -> dict[str, Any]:
    """aiokafka's connection options (bootstrap servers, security) for ``settings``.

    KafkaIOError naming the ``[kafka]`` key when a setting cannot be used (an
    unknown protocol or mechanism, a certificate or key file that does not load).
    """
    protocol = settings.security_protocol.upper()
    if protocol not in SECURITY_PROTOCOLS:
        raise KafkaIOError(
            f"kafka.security_protocol: {settings.security_protocol!r} is not one of "
            f"{', '.join(SECURITY_PROTOCOLS)}"
        )
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "security_protocol": protocol,
    }
    if protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = ssl_context(settings)
    if protocol.startswith("SASL_"):
        mechanism = (settings.sasl_mechanism or "").upper()  # (None on main's settings)
        if mechanism not in SASL_MECHANISMS:
            raise KafkaIOError(
                f"kafka.sasl_mechanism: {settings.sasl_mechanism!r} is not one of "
                f"{', '.join(SASL_MECHANISMS)} (security_protocol {protocol})"
            )
        options.update(
            sasl_mechanism=mechanism,
            sasl_plain_username=settings.sasl_username,
            sasl_plain_password=settings.sasl_password,
        )
    return options


def ssl_context(settings: KafkaSettings) -> ssl.SSLContext:
    """The TLS context of ``settings``: the system's CAs, or ``ssl_ca_file``; a client
    certificate (mutual TLS) when ``ssl_cert_file`` is set. The broker's name is checked
    against its certificate."""
    try:
        context: ssl.SSLContext = create_ssl_context(
            cafile=settings.ssl_ca_file or None,
            certfile=settings.ssl_cert_file or None,
            keyfile=settings.ssl_key_file or None,
        )
    except (OSError, ssl.SSLError, ValueError) as exc:
        if settings.ssl_cert_file or settings.ssl_key_file:
            keys = "kafka.ssl_ca_file, kafka.ssl_cert_file or kafka.ssl_key_file"
        else:
            keys = "kafka.ssl_ca_file"
        raise KafkaIOError(f"{keys}: cannot be loaded: {exc}") from None
    return context


def compression(settings: KafkaSettings) -> str | None:
    """aiokafka's ``compression_type`` for what crmhooks produces (None: uncompressed)."""
    name = settings.compression_type.lower()
    if name not in COMPRESSION_TYPES:
        raise KafkaIOError(
            f"kafka.compression_type: {settings.compression_type!r} is not one of "
            f"{', '.join(COMPRESSION_TYPES)}"
        )
    return None if name == "none" else name


def _first_server(settings: KafkaSettings) -> tuple[str, int]:
    first = settings.bootstrap_servers.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    try:
        return host.strip("[]") or first, int(port)
    except ValueError:
        return first, 9092


async def start_error(settings: KafkaSettings, exc: BaseException, doing: str) -> KafkaIOError:
    """A one-line error for a client that could not start (``doing``: what it was for).

    aiokafka's "Unable to bootstrap" is explained by one more connection to the
    first bootstrap server, which raises what went wrong.
    """
    where = settings.bootstrap_servers
    if not isinstance(exc, KafkaConnectionError):
        return KafkaIOError(f"Kafka at {where}: {doing} failed: {exc!r}")
    try:
        reason = await asyncio.wait_for(_connect_once(settings), EXPLAIN_TIMEOUT_S)
    except TimeoutError:
        host, port = _first_server(settings)
        reason = f"Kafka at {host}:{port}: no answer within {EXPLAIN_TIMEOUT_S:.0f} s"
    except Exception as probe:  # aiokafka.conn changed: say what aiokafka said
        log.debug("explaining the failed start failed: %r", probe)
        reason = None
    if reason is None:  # it connects now: a broker just started, or one of several down
        reason = f"cannot connect to Kafka at {where}: {exc}"
    return KafkaIOError(f"{reason} ({doing})")


async def _connect_once(settings: KafkaSettings) -> str | None:
    """Connect to the first bootstrap server as the clients do; what went wrong, or
    None when it worked."""
    # aiokafka's own connection (with the handshakes: TLS, versions, SASL), the one
    # the clients make: only to explain a failure, never to talk to Kafka.
    from aiokafka.conn import create_conn

    host, port = _first_server(settings)
    at = f"Kafka at {host}:{port}"
    options = client_options(settings)
    protocol = options["security_protocol"]
    try:
        conn = await create_conn(
            host,
            port,
            client_id="crmhooks-check",
            request_timeout_ms=int(EXPLAIN_TIMEOUT_S * 1000),
            ssl_context=options.get("ssl_context"),
            security_protocol=protocol,
            sasl_mechanism=options.get("sasl_mechanism"),
            sasl_plain_username=options.get("sasl_plain_username"),
            sasl_plain_password=options.get("sasl_plain_password"),
        )
    except SaslAuthenticationFailed as exc:
        return (
            f"{at} refused the SASL credentials ({options['sasl_mechanism']}, user "
            f"{settings.sasl_username!r}): {_scrubbed(exc, settings)}"
        )
    except UnsupportedSaslMechanismError as exc:
        return f"{at} does not accept SASL mechanism {options['sasl_mechanism']}: {exc}"
    except ssl.SSLCertVerificationError as exc:
        ca = (
            f"kafka.ssl_ca_file {settings.ssl_ca_file}"
            if settings.ssl_ca_file
            else "the system's CAs"
        )
        return f"{at}: TLS certificate not trusted ({ca}): {exc.verify_message}"
    except ssl.SSLError as exc:
        return (
            f"{at}: TLS handshake failed ({protocol}: is it a TLS listener?): {exc.reason or exc}"
        )
    except ConnectionRefusedError:
        return f"cannot connect to {at}: connection refused"
    except (KafkaConnectionError, ConnectionError, asyncio.IncompleteReadError) as exc:
        if protocol in ("PLAINTEXT", "SASL_PLAINTEXT"):
            hint = f"security_protocol is {protocol}: does this listener expect TLS?"
        else:
            hint = "is it a TLS listener? does it require a client certificate, ssl_cert_file?"
        return f"{at} closed the connection ({hint}): {_scrubbed(exc, settings)}"
    except KafkaError as exc:
        return f"{at}: {_scrubbed(exc, settings)}"
    except OSError as exc:
        return f"cannot connect to {at}: {exc.strerror or exc}"
    conn.close()
    return None


def _scrubbed(exc: BaseException, settings: KafkaSettings) -> str:
    text = str(exc) or type(exc).__name__
    if settings.sasl_password:
        text = text.replace(settings.sasl_password, "***")
    return text


async def ensure_topics(
    settings: KafkaSettings,
    names: Iterable[str],
    partitions: int,
    *,
    changelog: str | None = None,
) -> None:
    """Create the topics that do not exist yet (replication factor up to 3).

    ``changelog`` (compacted) gets as many partitions as ``names[0]``, the events
    topic: changelog partition p holds the state of events partition p.
    """
    names = list(dict.fromkeys(names))
    admin = AIOKafkaAdminClient(**client_options(settings))
    try:
        try:
            await admin.start()
        except KafkaError as exc:
            raise await start_error(settings, exc, "creating topics") from exc
        existing = set(await admin.list_topics())
        factor = min(3, len(admin._client.cluster.brokers()) or 1)
        missing = [n for n in names if n not in existing]
        if missing:
            await admin.create_topics(
                [NewTopic(n, num_partitions=partitions, replication_factor=factor) for n in missing]
            )
            log.info("created topics %s with %d partitions", missing, partitions)
        if changelog is not None and changelog not in existing:
            (described,) = await admin.describe_topics([names[0]])
            count = len(described.get("partitions") or []) or partitions
            await admin.create_topics(
                [
                    NewTopic(
                        changelog,
                        num_partitions=count,
                        replication_factor=factor,
                        topic_configs={"cleanup.policy": "compact"},
                    )
                ]
            )
            log.info("created changelog topic %s with %d partitions", changelog, count)
        await wait_visible(admin, names + ([changelog] if changelog is not None else []))
    except KafkaError as exc:
        raise KafkaIOError(f"cannot create topics on {settings.bootstrap_servers}: {exc}") from exc
    finally:
        await admin.close()


async def max_message_bytes(settings: KafkaSettings, topics: Sequence[str]) -> dict[str, int]:
    """Topic → its ``max.message.bytes``, the largest record batch the broker takes into
    it (one DescribeConfigs request). Topics the cluster does not tell of (a principal
    without the DescribeConfigs ACL, a topic missing) are left out, and all of them
    when asking fails: the caller has a default for them (a warning says why)."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    try:
        await admin.start()
        responses = await admin.describe_configs(
            [
                ConfigResource(ConfigResourceType.TOPIC, t, configs={"max.message.bytes": None})
                for t in dict.fromkeys(topics)
            ]
        )
    except (KafkaError, OSError) as exc:
        log.warning("max.message.bytes of %s not read: %s", list(topics), _scrubbed(exc, settings))
        return {}
    finally:
        await admin.close()
    found: dict[str, int] = {}
    for response in responses:
        for error_code, error, _, name, entries in response.resources:
            if error_code:
                why = f"{kafka_errors.for_code(error_code).__name__} {error or ''}".strip()
                log.warning("max.message.bytes of %s not read: %s", name, why)
                continue
            for key, value, *_ in entries:
                if key == "max.message.bytes" and value is not None:
                    with contextlib.suppress(ValueError):
                        found[name] = int(value)
    return found


class DescribesTopics(Protocol):
    """What ``wait_visible`` needs of aiokafka's admin client."""

    async def describe_topics(self, topics: list[str] | None = None) -> list[Any]: ...


async def wait_visible(
    admin: DescribesTopics, names: list[str], tries: int = 600, pause_s: float = 0.05
) -> None:
    """Until the cluster's metadata shows every topic of ``names`` with a leader for
    each partition (KafkaIOError naming those still missing after ``tries``).

    A topic just created is not in every broker's metadata at once (a broker just
    started applies it later still). A consumer that subscribes before it is seen
    gets no partitions, and aiokafka looks again only after ``metadata_max_age_ms``
    (5 minutes): the processor would sit idle.
    """
    missing = list(names)
    for attempt in range(tries):
        if attempt:
            await asyncio.sleep(pause_s)
        described = await admin.describe_topics(missing)
        visible = {
            t["topic"]
            for t in described
            if not t["error_code"]
            and t["partitions"]
            and all(not p["error_code"] and p["leader"] >= 0 for p in t["partitions"])
        }
        missing = [n for n in missing if n not in visible]
        if not missing:
            return
    raise KafkaIOError(
        f"topics {missing} are not in the cluster's metadata with a leader for every "
        f"partition after {tries * pause_s:.0f} s"
    )


class InRecord(Protocol):
    """One record read from a topic with its partition: aiokafka's ``ConsumerRecord``."""

    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


async def read_topic(
    settings: KafkaSettings, topic: str, *, follow: bool = False, idle_timeout_s: float = 2.0
) -> AsyncIterator[InRecord]:
    """Every record of ``topic`` from the beginning (no consumer group, nothing committed).

    Without ``follow`` it stops at the end offsets seen when it started, or after
    ``idle_timeout_s`` with nothing new.
    """
    consumer = AIOKafkaConsumer(
        **client_options(settings),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        group_id=None,
    )
    try:
        try:
            await consumer.start()
        except KafkaError as exc:
            raise await start_error(settings, exc, f"reading {topic}") from exc
        if topic not in await consumer.topics():
            return
        consumer.subscribe([topic])  # without a group: every partition, from the earliest
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 10.0
        while not consumer.assignment():
            if loop.time() > give_up:
                raise KafkaIOError(f"no partitions of {topic} assigned after 10 s")
            await asyncio.sleep(0.05)
        tps = sorted(consumer.assignment())
        ends = await consumer.end_offsets(tps)
        idle_since = asyncio.get_running_loop().time()
        while True:
            batches = await consumer.getmany(timeout_ms=200, max_records=1000)
            for messages in batches.values():
                for m in messages:
                    yield m
            now = asyncio.get_running_loop().time()
            if batches:
                idle_since = now
            if follow:
                continue
            positions = {tp: await consumer.position(tp) for tp in tps}
            if all(positions[tp] >= ends[tp] for tp in tps) or now - idle_since > idle_timeout_s:
                return
    except KafkaError as exc:
        raise KafkaIOError(f"cannot read {topic} from {settings.bootstrap_servers}: {exc}") from exc
    finally:
        await consumer.stop()


async def produce_records(
    settings: KafkaSettings,
    records: Sequence[tuple[str, bytes | None, bytes]],
    headers: Sequence[tuple[str, bytes]] | None = None,
    partition: int | None = None,
) -> None:
    """Produce records with a short-lived producer and wait for every acknowledgement;
    ``partition``: to that partition (else the key's)."""
    producer = AIOKafkaProducer(
        **client_options(settings),
        acks="all",
        linger_ms=5,
        compression_type=compression(settings),
    )
    try:
        try:
            await producer.start()
        except KafkaError as exc:
            raise await start_error(settings, exc, "producing") from exc
        extra = list(headers) if headers else None
        futures = [
            await producer.send(t, value=v, key=k, headers=extra, partition=partition)
            for t, k, v in records
        ]
        await asyncio.gather(*futures)
    except KafkaError as exc:
        raise ProduceError(f"produce to {settings.bootstrap_servers} failed: {exc}") from exc
    finally:
        await producer.stop()
