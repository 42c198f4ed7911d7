"""The command line: run, check-config, preview, replay-dlq, resume, tail."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from zoneinfo import ZoneInfo

from crmhooks import __version__
from crmhooks.config import Config, load_config
from crmhooks.errors import ConfigError, CrmhooksError, InvalidEvent
from crmhooks.events import decode_event


def _load(path: str) -> Config:
    return load_config(path)


def cmd_run(args: argparse.Namespace) -> int:
    from crmhooks.runner import run_processor

    config = _load(args.config)
    asyncio.run(run_processor(config))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    print(
        f"{args.config}: ok ({len(config.rules)} rules, {len(config.webhooks)} webhooks, "
        f"{len(config.orgs)} organisations)"
    )
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    from crmhooks.modules import ModuleCatalog
    from crmhooks.templates import CompiledWebhook, RenderContext

    config = _load(args.config)
    webhook = config.webhooks.get(args.webhook)
    if webhook is None:
        print(f"preview: no webhook named {args.webhook!r}", file=sys.stderr)
        return 2
    try:
        event = decode_event(Path(args.event).read_bytes())
    except OSError as exc:
        print(f"preview: cannot read {args.event}: {exc.strerror}", file=sys.stderr)
        return 2
    catalog = ModuleCatalog(config.custom_modules)
    ctx = RenderContext(
        module=catalog.canonical(event.module) or event.module,
        record=event.record,
        related=event.related,
        user=event.user,
        organization=event.organization,
        time_zone=ZoneInfo(config.org(event.org_id).time_zone),
    )
    request = CompiledWebhook(webhook, catalog).render(ctx)
    body = request.body.decode("utf-8", "replace")
    for name in webhook.secret_params:
        value = webhook.custom_params.get(name)
        if value:
            body = body.replace(value, "***")
    print(f"{request.method} {request.redacted_url}")
    print(f"User-Agent: crmhooks/{__version__}")
    for name, value in request.headers.items():
        print(f"{name}: {value}")
    if webhook.secret:
        print("webhook-signature: v1,*** (signed with the webhook secret)")
    print()
    print(body)
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
    parser.add_argument("--log-level", default=os.environ.get("CRMHOOKS_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", required=True, help="the TOML config file")
        return p

    command("run", "run the processor").set_defaults(func=cmd_run)
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
