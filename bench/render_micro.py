"""Micro-benchmark of template rendering: median µs per ``CompiledWebhook.render``, per shape.

    .venv/bin/python -m bench.render_micro

Compare two versions of ``src/`` by running it with ``PYTHONPATH`` set to each
one's ``src``, alternated a few times (a busy moment of the shared machine
slows one run, not a version). Times are this process's CPU time, so that
waiting for a core on a shared machine does not count. Every shape is rendered once first and its
request printed as a sha256 prefix: two versions that render the same bytes
print the same digests.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
import timeit
from collections.abc import Callable
from functools import partial
from zoneinfo import ZoneInfo

from crmhooks.config import BodySpec, Webhook
from crmhooks.modules import ModuleCatalog
from crmhooks.templates import CompiledWebhook, RenderContext, RenderedRequest

# The bench's webhook (bench.run.BODY_TEMPLATE): a raw JSON body, three strings and a number.
BENCH_JSON = (
    '{"deal":"${Potentials.Potential Name}","amount":${Potentials.Amount},'
    '"owner":"${Potentials.Potential Owner}","t":${Potentials.T}}'
)
# SPEC §3's Zoho Creator document, sent as the XMLString form parameter.
CREATOR_XML = """
<ZohoCreator><applicationlist><application name='sales-commissions'><formlist>
<form name='Commissions'><add>
  <field name='Name'><value>${Potentials.Potential Name}</value></field>
  <field name='Closed_Amount'><value>${Potentials.Amount}</value></field>
  <field name='Customer_Name'><value>${Accounts.Account Name}</value></field>
</add></form></formlist></application></applicationlist></ZohoCreator>
"""
# A raw XML body with an attribute, text and a CDATA section of two placeholders.
NOTE_XML = (
    '<note owner="${Potentials.Potential Owner}"><title>${Potentials.Potential Name}</title>'
    "<body><![CDATA[${Potentials.Potential Name}: ${Potentials.Description}]]></body></note>"
)

SHAPES: dict[str, Webhook] = {
    "bench": Webhook(
        name="Hook",
        url="http://127.0.0.1:8080/hook",
        module="Potentials",
        body=BodySpec(format="json", template=BENCH_JSON),
    ),
    "creator": Webhook(
        name="Creator",
        url="https://creator.example.com/api/xml/write",
        module="Potentials",
        body=BodySpec(format="xml", template=CREATOR_XML, param="XMLString"),
        entity_params={"deal": "${Potentials.Potential Name}"},
        custom_params={"apikey": "k3y", "zc_ownername": "acme"},
        secret_params=frozenset({"apikey"}),
    ),
    "xml-raw": Webhook(
        name="Note",
        url="https://notes.example.com/in",
        module="Potentials",
        body=BodySpec(format="xml", template=NOTE_XML),
    ),
    "get-path": Webhook(
        name="Get",
        url="https://h.example.com/deals/${Potentials.Potential Owner}/${Potentials.T}?v=2",
        module="Potentials",
        method="GET",
        entity_params={"name": "${Potentials.Potential Name}", "amt": "${Potentials.Amount}"},
    ),
}

CONTEXT = RenderContext(
    module="Potentials",
    record={
        "Potential Name": "Deal 12345",
        "Amount": 25000,
        "Potential Owner": "Ana Silva",
        "T": 1764320400123,
        "Description": "Multi-year renewal, ships in Q1 [EMEA]",
    },
    related={"Accounts": {"Account Name": "Acme Corp"}},
    user=None,
    organization=None,
    time_zone=ZoneInfo("Asia/Shanghai"),
)


def digest(request: RenderedRequest) -> str:
    parts = [request.method, request.url, repr(sorted(request.headers.items()))]
    data = "\n".join(parts).encode() + b"\n" + request.body
    return hashlib.sha256(data).hexdigest()[:12]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20_000, help="renders per run")
    parser.add_argument("--repeat", type=int, default=25, help="runs per shape")
    args = parser.parse_args(argv)
    catalog = ModuleCatalog()
    calls: dict[str, Callable[[], RenderedRequest]] = {}
    for shape, webhook in SHAPES.items():
        calls[shape] = partial(CompiledWebhook(webhook, catalog).render, CONTEXT)
    times: dict[str, list[float]] = {shape: [] for shape in calls}
    for _ in range(args.repeat):  # shapes take turns, run by run
        for shape, call in calls.items():
            times[shape].append(timeit.timeit(call, number=args.number, timer=time.process_time))
    for shape, call in calls.items():
        us = statistics.median(times[shape]) / args.number * 1e6
        print(f"{shape:9} {us:7.3f} µs  {digest(call())}")


if __name__ == "__main__":
    main()
