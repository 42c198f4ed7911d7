"""The command line: run, check-config, preview, replay-dlq, resume, tail."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from zoneinfo import ZoneInfo

from crmhooks import __version__
from crmhooks.actions import action_ids
from crmhooks.config import Config, load_config
from crmhooks.errors import ConfigError, CrmhooksError, InvalidEvent
from crmhooks.events import RecordEvent, decode_event
from crmhooks.templates import CompiledWebhook, RenderContext


def _load(path: str) -> Config:
    return load_config(path)


def cmd_run(args: argparse.Namespace) -> int:
    from crmhooks.runner import run_processor

    config = _load(args.config)
    _tune_gc()
    tls = config.kafka.security_protocol.upper() in ("SSL", "SASL_SSL")
    with asyncio.Runner(loop_factory=_loop_factory(args.event_loop, tls=tls)) as runner:
        runner.run(run_processor(config))
    return 0


# Collections for a long-running server that allocates a few hundred short-lived
# objects per action (futures, tasks, requests): CPython's default (700, 10, 10)
# runs a full collection, walking every live object, every 70,000 allocations.
# Measured in the bench: instant deliveries +25 %, latency p99 31 -> 23 ms.
GC_THRESHOLDS = (50_000, 50, 100)


def _tune_gc() -> None:
    """Larger, rarer collections; what exists at start (modules, config) is frozen
    out of them, as it lives as long as the process."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def _event_loop_name(text: str) -> str:
    if text not in EVENT_LOOPS:
        raise argparse.ArgumentTypeError(
            f"unknown event loop {text!r} (choose from {', '.join(EVENT_LOOPS)})"
        )
    return text


def _loop_factory(
    name: str, *, tls: bool = False
) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop (C, libuv) when installed; ``asyncio``: the standard one.

    ``auto`` picks asyncio's when Kafka is reached over TLS (``tls``): on uvloop 0.23,
    aiokafka's group join over TLS stalled for 30-60 s in 2 of 5 starts (the member
    then expired, and was revoked and joined again), never in 6 on asyncio's loop
    (docs/kafka.md). ``uvloop`` asked for by name is used anyway.
    """
    if name == "asyncio" or (name == "auto" and tls):
        return None
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise CrmhooksError("--event-loop uvloop: uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def cmd_check_config(args: argparse.Namespace) -> int:
    """Exit 0 with a one-line summary; an invalid config raises ConfigError (main: exit 1)."""
    config = _load(args.config)
    instant = sum(1 for rule in config.rules if rule.instant is not None)
    scheduled = sum(len(rule.scheduled) for rule in config.rules)
    print(
        f"{args.config}: ok ({_count(len(config.orgs), 'organisation')}, "
        f"{_count(len(config.webhooks), 'webhook')}, {_count(len(config.rules), 'rule')}: "
        f"{instant} instant, {scheduled} scheduled)"
    )
    return 0


# Exit status of `preview` when the webhook or the event file is wrong (the config
# itself being invalid is 1, as for every command).
_PREVIEW_USAGE_ERROR = 2


class _PreviewError(Exception):
    """A problem with the webhook name or the event file given to `preview`."""


def _preview_event(path: str, max_bytes: int) -> RecordEvent:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise _PreviewError(f"cannot read event file {path}: {exc.strerror}") from None
    try:
        return decode_event(data, max_bytes)
    except InvalidEvent as exc:
        raise _PreviewError(
            f"event file {path} is not a valid record event: {exc.message}"
        ) from None


def _preview_action_id(config: Config, event: RecordEvent, webhook: str) -> str:
    """The webhook-id the first rule sending ``webhook`` would give this event's action."""
    for rule in config.rules:
        if webhook in rule.webhook_names:
            ids = action_ids(event.event_id, rule.id, list(rule.webhook_names))
            return next(
                a for a, name in zip(ids, rule.webhook_names, strict=True) if name == webhook
            )
    return f"{event.event_id}:<rule>:{webhook}"  # no rule sends it (yet)


def cmd_preview(args: argparse.Namespace) -> int:
    """Print the request a webhook would send for an event (SPEC §4), secrets as ***.

    Line 1 is ``METHOD URL`` (query string included), then the headers: the
    template's and those delivery adds (the timestamp and signature depend on
    the moment of sending; the signature is never shown), a blank line, the body.
    """
    config = _load(args.config)
    try:
        webhook = config.webhooks.get(args.webhook)
        if webhook is None:
            known = ", ".join(sorted(config.webhooks)) or "none"
            raise _PreviewError(
                f"no webhook named {args.webhook!r} in {args.config} (known: {known})"
            )
        event = _preview_event(args.event, config.kafka.max_event_bytes)
        module = config.catalog.canonical(event.module)
        if module != webhook.module:
            raise _PreviewError(
                f"event file {args.event} is a {event.module} event; "
                f"webhook {webhook.name} is for {webhook.module}"
            )
    except _PreviewError as exc:
        print(f"preview: {exc}", file=sys.stderr)
        return _PREVIEW_USAGE_ERROR
    if webhook.org is not None and webhook.org != event.org_id:
        print(
            f"preview: note: webhook {webhook.name} belongs to {webhook.org}; "
            f"it is never sent for events of {event.org_id}",
            file=sys.stderr,
        )
    ctx = RenderContext(
        module=module,
        record=event.record,
        related=event.related,
        user=event.user,
        organization=event.organization,
        time_zone=ZoneInfo(config.org(event.org_id).time_zone),
    )
    request = CompiledWebhook(webhook, config.catalog).render(ctx)
    # redacted_body is set exactly when the body carries secret parameters (a form
    # body); a raw body never does: ${env:...} is only allowed in custom_params.
    body = request.body if request.redacted_body is None else request.redacted_body
    lines = [f"{request.method} {request.redacted_url}"]
    lines += [f"{name}: {value}" for name, value in request.headers.items()]
    lines += [
        f"User-Agent: crmhooks/{__version__}",
        "Accept-Encoding: identity",
        f"webhook-id: {_preview_action_id(config, event, webhook.name)}",
        "webhook-timestamp: <epoch seconds when sent>",
    ]
    if webhook.secret is not None:
        lines.append("webhook-signature: v1,***")
    lines += ["", body.decode("utf-8", "replace")]
    print("\n".join(lines))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from crmhooks.store import Store

    config = _load(args.config)

    async def resume() -> int:
        async with Store(config.store.path) as store:
            return await store.resume(args.rule, args.webhook)

    count = asyncio.run(resume())
    print(f"resumed {args.webhook} of rule {args.rule} in {count} organisation(s)")
    return 0


def cmd_replay_dlq(args: argparse.Namespace) -> int:
    from crmhooks.tools import replay_dlq

    config = _load(args.config)
    count = asyncio.run(replay_dlq(config, args.error_code, args.timeout_s))
    print(f"replayed {count} dead-lettered event(s) to {config.kafka.events_topic}")
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    from crmhooks.tools import tail_results

    config = _load(args.config)
    asyncio.run(
        tail_results(
            config,
            org=args.org,
            event_id=args.event,
            follow=args.follow,
            topic=args.topic,
            limit=args.limit,
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crmhooks", description=__doc__)
    parser.add_argument("--version", action="version", version=f"crmhooks {__version__}")
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        default=os.environ.get("CRMHOOKS_LOG_LEVEL", "INFO").upper(),
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", required=True, help="the TOML config file")
        return p

    run = command("run", "run the processor")
    run.add_argument(
        "--event-loop",
        type=_event_loop_name,  # applied to the environment's default too
        default=os.environ.get("CRMHOOKS_EVENT_LOOP", "auto"),
        help="auto: uvloop when installed (faster), else asyncio's (env CRMHOOKS_EVENT_LOOP)",
    )
    run.set_defaults(func=cmd_run)
    command("check-config", "validate the config; exit 1 listing every error").set_defaults(
        func=cmd_check_config
    )
    p = command("preview", "print the request a webhook would send for an event")
    p.add_argument("--webhook", required=True)
    p.add_argument("--event", required=True, help="a JSON file holding one record event")
    p.set_defaults(func=cmd_preview)
    p = command("replay-dlq", "re-publish dead-lettered events to the events topic")
    p.add_argument("--error-code", help="only dead letters with this error_code")
    p.add_argument("--timeout-s", type=float, default=5.0, help="stop after this long idle")
    p.set_defaults(func=cmd_replay_dlq)
    p = command("resume", "lift the suspension of a rule's webhook")
    p.add_argument("--rule", required=True)
    p.add_argument("--webhook", required=True)
    p.set_defaults(func=cmd_resume)
    p = command("tail", "print result records (or dead letters) as a table")
    p.add_argument("--org", help="only this organisation")
    p.add_argument("--event", help="only this event_id")
    p.add_argument("--follow", action="store_true", help="keep waiting for new records")
    p.add_argument("--dlq", dest="topic", action="store_const", const="dlq", default="results")
    p.add_argument("--limit", type=int, default=0, help="stop after this many records")
    p.set_defaults(func=cmd_tail)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    try:
        result: int = args.func(args)
    except ConfigError as exc:
        print(f"{args.config}: {len(exc.errors)} error(s):", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return 1
    except InvalidEvent as exc:
        print(f"invalid event: {exc.message}", file=sys.stderr)
        return 1
    except CrmhooksError as exc:
        print(f"crmhooks: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
