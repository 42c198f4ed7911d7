"""The admin endpoint: a real aiohttp server on 127.0.0.1, scraped and probed over HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from crmhooks.admin import AdminServer, Liveness, Readiness, parse_listen, serving
from crmhooks.errors import AdminError
from crmhooks.metrics import FAMILIES, Metrics


class Ticks:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:9464", ("0.0.0.0", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("9464", "expected HOST:PORT"),
        (":9464", "expected HOST:PORT"),
        ("127.0.0.1:", "expected HOST:PORT"),
        ("127.0.0.1:http", "expected HOST:PORT"),
        ("127.0.0.1:99999", "port 99999 is not below 65536"),
        ("::1:9464", "write an IPv6 address in brackets"),
        ("[nope]:9464", "'nope' is not an IPv6 address"),
    ],
)
def test_parse_listen_names_what_is_wrong(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_listen(text)


@pytest.fixture
async def admin() -> AsyncIterator[tuple[AdminServer, aiohttp.ClientSession]]:
    metrics = Metrics()
    readiness = Readiness()
    async with (
        AdminServer("127.0.0.1:0", metrics, readiness, Liveness(readiness)) as server,
        aiohttp.ClientSession(f"http://127.0.0.1:{server.port}") as http,
    ):
        yield server, http


async def test_metrics_are_served_in_the_prometheus_text_format(
    admin: tuple[AdminServer, aiohttp.ClientSession],
) -> None:
    server, http = admin
    server.metrics.actions.inc("delivered", 3)
    server.metrics.delivery.observe("none", 0.02)
    async with http.get("/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await response.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in FAMILIES:
        assert name.removesuffix("_total") in families
    delivered = [
        s.value for s in families["crmhooks_actions"].samples if s.labels == {"status": "delivered"}
    ]
    assert delivered == [3]
    assert "process_cpu_seconds" in families


async def test_metrics_in_openmetrics_when_the_scraper_asks_for_it(
    admin: tuple[AdminServer, aiohttp.ClientSession],
) -> None:
    _, http = admin
    headers = {"Accept": "application/openmetrics-text; version=1.0.0"}
    async with http.get("/metrics", headers=headers) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await response.text()).rstrip().endswith("# EOF")


async def get(http: aiohttp.ClientSession, path: str) -> tuple[int, str]:
    async with http.get(path) as response:
        return response.status, await response.text()


async def test_readyz_follows_the_processor_through_assignment_restore_and_stop(
    admin: tuple[AdminServer, aiohttp.ClientSession],
) -> None:
    server, http = admin
    readiness = server.readiness
    status, body = await get(http, "/readyz")
    assert status == 503
    assert body.startswith("starting: not connected to Kafka yet (for ")
    readiness.set_waiting()
    assert (await get(http, "/readyz"))[1].startswith("no partitions assigned yet")
    readiness.set_restoring({2, 0})
    status, body = await get(http, "/readyz")
    assert status == 503
    assert body.startswith("restoring partitions [0, 2] from the changelog (for ")
    readiness.set_ready({0, 1, 2})
    assert await get(http, "/readyz") == (200, "ready: partitions [0, 1, 2]\n")
    readiness.set_rebalancing()
    assert (await get(http, "/readyz"))[0] == 503
    readiness.set_ready(set())
    status, body = await get(http, "/readyz")
    assert status == 200
    assert "no partitions assigned (more processes than partitions)" in body
    readiness.set_stopping()
    status, body = await get(http, "/readyz")
    assert status == 503
    assert body.startswith("stopping")


async def test_healthz_is_200_while_the_loop_turns(
    admin: tuple[AdminServer, aiohttp.ClientSession],
) -> None:
    server, http = admin
    server.liveness.beat()
    status, body = await get(http, "/healthz")
    assert status == 200
    assert body.startswith("alive (event loop ")


async def test_healthz_is_503_once_the_processor_loop_died(
    admin: tuple[AdminServer, aiohttp.ClientSession],
) -> None:
    server, http = admin

    async def consume() -> None:
        raise RuntimeError("store closed")

    task = asyncio.create_task(consume())
    server.liveness.watch(task)
    with pytest.raises(RuntimeError):
        await task
    await asyncio.sleep(0)  # done callbacks run on the next turn
    assert await get(http, "/healthz") == (
        503,
        "processor loop ended: RuntimeError: store closed\n",
    )


async def test_a_cancelled_loop_is_a_stop_not_a_death() -> None:
    liveness = Liveness()
    task = asyncio.create_task(asyncio.sleep(10))
    liveness.watch(task)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert liveness.status()[0]


def test_a_stalled_loop_fails_liveness_except_while_restoring() -> None:
    clock = Ticks()
    readiness = Readiness(clock)
    liveness = Liveness(readiness, stall_after_s=120.0, clock=clock)
    assert liveness.status()[0]  # no beat yet: starting
    liveness.beat()
    readiness.set_ready([0])
    clock.now_s += 119
    assert liveness.status()[0]
    clock.now_s += 2
    assert liveness.status() == (False, "processor loop has not turned for 121 s")
    readiness.set_restoring([1])  # a long restore holds the loop: not a stall
    assert liveness.status()[0]
    readiness.set_ready([0, 1])
    liveness.beat()
    assert liveness.status()[0]


async def test_a_taken_port_is_a_one_line_error(
    admin: tuple[AdminServer, aiohttp.ClientSession],
) -> None:
    server, _ = admin
    readiness = Readiness()
    taken = f"127.0.0.1:{server.port}"
    with pytest.raises(AdminError) as info:
        async with AdminServer(taken, Metrics(), readiness, Liveness(readiness)):
            pass
    assert str(info.value) == f"[admin] listen '{taken}': cannot listen: address already in use"


def test_a_bad_listen_address_is_an_admin_error() -> None:
    readiness = Readiness()
    with pytest.raises(AdminError, match=r"\[admin\] listen '9464': expected HOST:PORT"):
        AdminServer("9464", Metrics(), readiness, Liveness(readiness))


async def test_an_empty_listen_serves_nothing() -> None:
    readiness = Readiness()
    async with serving("", Metrics(), readiness, Liveness(readiness)) as server:
        assert server is None
    async with serving("127.0.0.1:0", Metrics(), readiness, Liveness(readiness)) as server:
        assert server is not None
        assert server.port > 0
