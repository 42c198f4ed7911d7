"""The command line: run, check-config, preview, send-test, explain, replay-dlq, resume,
redeliver, tail, config."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from zoneinfo import ZoneInfo

from crmhooks import __version__
from crmhooks.actions import action_ids
from crmhooks.config import Config, Webhook, config_warnings, load_config
from crmhooks.errors import ConfigError, CrmhooksError, InvalidEvent, TemplateError
from crmhooks.events import RecordEvent, decode_event
from crmhooks.explain import StoredState
from crmhooks.logs import LOG_LEVELS, configure_logging
from crmhooks.showing import shown_request
from crmhooks.templates import CompiledWebhook, RenderContext


def _load(path: str) -> Config:
    return load_config(path)


def cmd_run(args: argparse.Namespace) -> int:
    from crmhooks.runner import run_processor

    config = _load(args.config)
    configure_logging(*run_log_settings(config, _log_level_override(args)))
    _tune_gc()
    tls = config.kafka.security_protocol.upper() in ("SSL", "SASL_SSL")
    with asyncio.Runner(loop_factory=_loop_factory(args.event_loop, tls=tls)) as runner:
        runner.run(run_processor(config, config_path=args.config))
    return 0


def run_log_settings(config: Config, level_override: str | None) -> tuple[str, str]:
    """(format, level) for `crmhooks run`: the config's [log] section; a level given by
    --log-level or CRMHOOKS_LOG_LEVEL wins over the file's (as the environment's
    connection settings do), so one run can be made verbose without editing it."""
    level = level_override or config.log.level
    return config.log.format, level.upper()


LOG_LEVEL_ENV = "CRMHOOKS_LOG_LEVEL"


def _log_level_override(args: argparse.Namespace) -> str | None:
    """--log-level, else CRMHOOKS_LOG_LEVEL, else None (the config's, or INFO)."""
    if args.log_level:
        return str(args.log_level)
    env = os.environ.get(LOG_LEVEL_ENV, "").strip()
    if not env:
        return None
    if env.upper() not in LOG_LEVELS:
        raise CrmhooksError(f"{LOG_LEVEL_ENV}={env!r}: expected one of {', '.join(LOG_LEVELS)}")
    return env.upper()


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
    """Exit 0 with a one-line summary (and warnings on stderr); an invalid config raises
    ConfigError (main: exit 1)."""
    config = _load(args.config)
    for warning in config_warnings(config):
        print(f"{args.config}: warning: {warning}", file=sys.stderr)
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


def _as_for_org(config: Config, args: argparse.Namespace, command: str) -> Config:
    """``config`` as it applies to the organisation of the event file (its document
    from the config topic, when it has one: ``config_commands.as_for_org``)."""
    if not config.kafka.config_topic:
        return config
    from crmhooks.config_commands import as_for_org

    event = _preview_event(args.event, config.kafka.max_event_bytes)
    return as_for_org(config, args.config, event.org_id, command)


def _webhook_and_event(
    config: Config, args: argparse.Namespace, command: str
) -> tuple[Webhook, RecordEvent, RenderContext]:
    """The webhook and event a command names, and the context it renders from;
    _PreviewError naming what is wrong with either."""
    webhook = config.webhooks.get(args.webhook)
    if webhook is None:
        known = ", ".join(sorted(config.webhooks)) or "none"
        raise _PreviewError(f"no webhook named {args.webhook!r} in {args.config} (known: {known})")
    event = _preview_event(args.event, config.kafka.max_event_bytes)
    module = config.catalog.canonical(event.module)
    if module is None or module != webhook.module:
        raise _PreviewError(
            f"event file {args.event} is a {event.module} event; "
            f"webhook {webhook.name} is for {webhook.module}"
        )
    if webhook.org is not None and webhook.org != event.org_id:
        print(
            f"{command}: note: webhook {webhook.name} belongs to {webhook.org}; "
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
    return webhook, event, ctx


def cmd_preview(args: argparse.Namespace) -> int:
    """Print the request a webhook would send for an event (SPEC §4), secrets as ***.

    Line 1 is ``METHOD URL`` (query string included), then the headers: the
    template's and those delivery adds (the timestamp and signature depend on
    the moment of sending; the signature is never shown), a blank line, the body.
    """
    config = _load(args.config)
    try:
        config = _as_for_org(config, args, "preview")
        webhook, event, ctx = _webhook_and_event(config, args, "preview")
    except _PreviewError as exc:
        print(f"preview: {exc}", file=sys.stderr)
        return _PREVIEW_USAGE_ERROR
    try:
        request = CompiledWebhook(webhook, config.catalog).render(ctx)
    except TemplateError as exc:  # a header or URL this event would break
        print(f"preview: {exc}", file=sys.stderr)
        return 1
    action_id = _preview_action_id(config, event, webhook.name)
    lines = shown_request(request, webhook, action_id, "<epoch seconds when sent>")
    print("\n".join(lines))
    return 0


def cmd_send_test(args: argparse.Namespace) -> int:
    """Render and really send one request now (SPEC §11); exit 0 when delivered.

    Exit 1 when it was not delivered (any error class, a template error, an
    invalid config), 2 for an unknown webhook or a bad event file (as preview).
    """
    from crmhooks.sendtest import send_test

    config = _load(args.config)
    try:
        config = _as_for_org(config, args, "send-test")
        webhook, _, ctx = _webhook_and_event(config, args, "send-test")
    except _PreviewError as exc:
        print(f"send-test: {exc}", file=sys.stderr)
        return _PREVIEW_USAGE_ERROR
    return asyncio.run(send_test(config, webhook, ctx, sys.stdout))


def cmd_explain(args: argparse.Namespace) -> int:
    """For each rule of the event's organisation and module: matched or not, and why."""
    import time

    from crmhooks.explain import explain_event, render

    config = _load(args.config)
    try:
        config = _as_for_org(config, args, "explain")
        event = _preview_event(args.event, config.kafka.max_event_bytes)
    except _PreviewError as exc:
        print(f"explain: {exc}", file=sys.stderr)
        return _PREVIEW_USAGE_ERROR
    state = _stored_state(config, event)
    now_ms = int(time.time() * 1000)
    print(
        render(config, event, explain_event(config, event, now_ms=now_ms, state=state), state),
        end="",
    )
    return 0


def _stored_state(config: Config, event: RecordEvent) -> StoredState | None:
    """The store's repeat=once flags and suspensions for the event, when the config's
    store is on this machine (never created here); None when it is not, or unreadable."""
    from crmhooks.rules import RuleIndex
    from crmhooks.store import Store
    from crmhooks.workflow import once_key

    path = Path(config.store.path)
    if not path.is_file():
        return None
    rules = RuleIndex(config.rules, config.catalog).candidates(event.org_id, event.module)

    async def read() -> StoredState:
        async with Store(path) as store:
            keys = {once_key(r.id, event.record_key): r.id for r in rules if r.repeat == "once"}
            flags = await store.once_states(list(keys)) if keys else {}
            table = await store.suspension_table()
        return StoredState(
            source=f"the store {path}",
            once_met={keys[k]: met for k, met in flags.items()},
            suspended=frozenset(
                (rule, webhook)
                for (org, rule, webhook), (_, suspended, _) in table.items()
                if org == event.org_id and suspended
            ),
        )

    try:
        return asyncio.run(read())
    except CrmhooksError as exc:
        print(f"explain: note: store not read ({exc})", file=sys.stderr)
        return None


def cmd_resume(args: argparse.Namespace) -> int:
    from crmhooks.store import Store

    config = _load(args.config)

    async def resume() -> int:
        async with Store(config.store.path) as store:
            return await store.resume(args.rule, args.webhook)

    count = asyncio.run(resume())
    print(f"resumed {args.webhook} of rule {args.rule} in {count} organisation(s)")
    return 0


def cmd_redeliver(args: argparse.Namespace) -> int:
    """Ask the owner of a finished action's partition to send it again (SPEC §11)."""
    from crmhooks.redeliver import request_redelivery, store_file

    config = _load(args.config)
    print(asyncio.run(request_redelivery(config, store_file(config), args.action)))
    return 0


def cmd_replay_dlq(args: argparse.Namespace) -> int:
    from crmhooks.progress import Progress
    from crmhooks.tools import replay_dlq

    config = _load(args.config)
    skipped: list[str] = []
    with Progress("replay-dlq") as progress:  # drawn on stderr when it is a terminal
        count = asyncio.run(
            replay_dlq(config, args.error_code, args.timeout_s, progress, skipped.append)
        )
    for line in skipped:
        print(f"replay-dlq: {line}", file=sys.stderr)
    more = f"; {len(skipped)} truncated dead letter(s) not replayed" if skipped else ""
    print(f"replayed {count} dead-lettered event(s) to {config.kafka.events_topic}{more}")
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


def cmd_config(args: argparse.Namespace) -> int:
    """``config push|get|rm``: an organisation's document on the config topic (SPEC §3.2)."""
    import logging

    from crmhooks import config_commands
    from crmhooks.progress import Progress

    # A broker that cannot be reached is this command's one-line error, not also
    # aiokafka's own lines about each try.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    config = _load(args.config)
    if args.action == "push":
        try:
            line = asyncio.run(config_commands.push(config, args.config, args.org, args.file))
        except ConfigError as exc:  # the document's errors, named after its file
            print(f"{args.file}: {len(exc.errors)} error(s):", file=sys.stderr)
            for error in exc.errors:
                print(f"  {error}", file=sys.stderr)
            return 1
        print(line)
    elif args.action == "rm":
        print(asyncio.run(config_commands.remove(config, args.config, args.org)))
    else:
        import orjson

        with Progress("config get") as progress:  # drawn on stderr when it is a terminal
            shown = asyncio.run(config_commands.get(config, args.config, args.org, progress))
        print(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crmhooks", description=__doc__)
    parser.add_argument("--version", action="version", version=f"crmhooks {__version__}")
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default=None,
        help=f"default: env {LOG_LEVEL_ENV}, else the config's [log] level (run), else INFO",
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
    p = command("send-test", "render and really send one request now; print it and the outcome")
    p.add_argument("--webhook", required=True)
    p.add_argument("--event", required=True, help="a JSON file holding one record event")
    p.set_defaults(func=cmd_send_test)
    p = command("explain", "why each rule of an event's organisation matched it or not")
    p.add_argument("--event", required=True, help="a JSON file holding one record event")
    p.set_defaults(func=cmd_explain)
    p = command("replay-dlq", "re-publish dead-lettered events to the events topic")
    p.add_argument("--error-code", help="only dead letters with this error_code")
    p.add_argument("--timeout-s", type=float, default=5.0, help="stop after this long idle")
    p.set_defaults(func=cmd_replay_dlq)
    p = command("resume", "lift the suspension of a rule's webhook")
    p.add_argument("--rule", required=True)
    p.add_argument("--webhook", required=True)
    p.set_defaults(func=cmd_resume)
    p = command("redeliver", "send a finished action again, as a new attempt of the same id")
    p.add_argument("--action", required=True, help="the action_id (as in results)")
    p.set_defaults(func=cmd_redeliver)
    p = command("tail", "print result records (or dead letters) as a table")
    p.add_argument("--org", help="only this organisation")
    p.add_argument("--event", help="only this event_id")
    p.add_argument("--follow", action="store_true", help="keep waiting for new records")
    p.add_argument("--dlq", dest="topic", action="store_const", const="dlq", default="results")
    p.add_argument("--limit", type=int, default=0, help="stop after this many records")
    p.set_defaults(func=cmd_tail)
    p = sub.add_parser("config", help="an organisation's document on the config topic")
    actions = p.add_subparsers(dest="action", required=True)
    for name, help_text in (
        ("push", "check a document (TOML or JSON) and write it to the config topic"),
        ("get", "print the organisation's document in force, secrets as ***"),
        ("rm", "write the organisation's tombstone: the config file applies to it again"),
    ):
        action = actions.add_parser(name, help=help_text)
        action.add_argument("--config", required=True, help="the TOML config file")
        action.add_argument("--org", required=True, help="the organisation's id (the key)")
        if name == "push":
            action.add_argument("--file", required=True, help="the document, .toml or .json")
        action.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # Text until `run` has read its config's [log] settings; other commands stay text.
        configure_logging("text", _log_level_override(args) or "INFO")
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
    except BrokenPipeError:
        # The reader went away (`| head`): not an error of ours. stdout is pointed at
        # /dev/null so that the interpreter's flush at exit does not fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports it
    return result


if __name__ == "__main__":
    sys.exit(main())
