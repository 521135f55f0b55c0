"""Job events on real Redis: the stream that appends, publishes and replays them, and their
wire format; the event hub across a lost Redis connection."""

from __future__ import annotations

import asyncio
import json
import secrets

import pytest
from redis.asyncio import Redis

from storage.events import NO_EVENT, EventId, EventType, JobEvent, JobEventStream
from tests.conftest import REDIS_BASE

pytestmark = pytest.mark.timeout(120)


async def test_event_stream_appends_publishes_and_replays(redis_client: Redis) -> None:
    stream = JobEventStream(redis_client, maxlen=1000, ttl_seconds=60)
    pubsub = redis_client.pubsub()
    await pubsub.subscribe("ferry:job:j1:live")
    batch = [("j1", JobEvent(f"1-{i}", EventType.DELTA, {"text": str(i)})) for i in range(1, 4)]
    batch.append(("j1", JobEvent("1-4", EventType.DONE, {"finish_reason": "stop"})))
    await stream.publish(batch)
    assert [str(e.id) for e in await stream.read_after("j1", NO_EVENT) or []] == [
        "1-1",
        "1-2",
        "1-3",
        "1-4",
    ]
    assert [e.id for e in await stream.read_after("j1", EventId(1, 2)) or []] == [
        EventId(1, 3),
        EventId(1, 4),
    ]
    assert await stream.read_after("nope", NO_EVENT) is None
    assert 0 < await redis_client.ttl("ferry:job:j1:events") <= 60  # terminal event sets TTL
    live = []
    while len(live) < 4:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
        if message:
            live.append(str(JobEvent.from_json(message["data"]).id))
    assert live == ["1-1", "1-2", "1-3", "1-4"]
    await pubsub.aclose()


async def test_one_publish_carries_many_jobs_events_and_any_text(redis_client: Redis) -> None:
    """Events of several jobs in one call each reach their own stream and channel, with
    their data intact whatever the text holds; a repeated id is refused by the stream (the
    replay stays as it was) and still published."""
    stream = JobEventStream(redis_client, maxlen=1000, ttl_seconds=60)
    pubsub = redis_client.pubsub()
    await pubsub.subscribe("ferry:job:a:live", "ferry:job:b:live")
    texts = ['say "hi"\n', "\u00e9t\u00e9 \U0001f600 \\ end", "}{", "<think>"]
    batch = [
        (job, JobEvent.delta(f"1-{i}", text, 1.5))
        for i, text in enumerate(texts, 1)
        for job in ("a", "b")
    ]
    batch.append(("a", JobEvent("1-5", EventType.DONE, {"finish_reason": "length"})))
    await stream.publish(batch)
    await stream.publish([("b", JobEvent("1-2", EventType.DELTA, {"text": "again"}))])
    live: dict[str, list[JobEvent]] = {"a": [], "b": []}
    while sum(map(len, live.values())) < len(batch) + 1:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
        if message:
            live[message["channel"].decode().split(":")[2]].append(
                JobEvent.from_json(message["data"])
            )
    for job in ("a", "b"):
        stored = await stream.read_after(job, NO_EVENT) or []
        assert [e.data["text"] for e in stored if e.type == EventType.DELTA] == texts
        assert all(e.data["ts"] == 1.5 for e in stored if e.type == EventType.DELTA)
    assert [e.data.get("text") for e in live["a"]] == [*texts, None]
    assert live["a"][-1] == JobEvent("1-5", EventType.DONE, {"finish_reason": "length"})
    assert [str(e.id) for e in live["b"]] == ["1-1", "1-2", "1-3", "1-4", "1-2"]
    assert 0 < await redis_client.ttl("ferry:job:a:events") <= 60
    assert await redis_client.ttl("ferry:job:b:events") == -1  # no terminal event yet
    await pubsub.aclose()


@pytest.mark.parametrize(
    "event",
    [
        JobEvent("1-1", EventType.DELTA, {"text": 'a "quoted", "data": } text\n', "ts": 1.25}),
        JobEvent(
            "2-17", EventType.USAGE, {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        ),
        JobEvent("1-9", EventType.DONE, {"finish_reason": None}),
        JobEvent("0-1", EventType.CANCELLED, {}),
    ],
)
def test_an_event_survives_the_wire_with_its_data_as_sent(event: JobEvent) -> None:
    """What is published (to_json, the publish script's shape) comes back equal, with the
    data's JSON text as json.dumps writes it (what SSE clients get)."""
    wire = event.to_json()
    back = JobEvent.from_json(wire.encode())
    assert back == event and back.id == event.id
    assert back.data_json == json.dumps(event.data)
    assert wire == json.dumps({"id": str(event.id), "type": event.type.value, "data": event.data})


@pytest.mark.parametrize(
    "text",
    [
        "",
        'say "hi"\n\t\\',
        "\u00e9t\u00e9 \u4e16\u754c \U0001f600",
        "\x00\x1f\x7f",
        "\ud800 lone surrogate",
        "</script>",
    ],
)
@pytest.mark.parametrize("ts", [1764130000.123456, 0.1, 1e20, None])
def test_a_delta_events_json_is_what_json_dumps_writes(text: str, ts: float | None) -> None:
    """A delta's JSON is json.dumps's text for its data, whatever the text holds, so
    replays, SSE and stored events all agree."""
    event = JobEvent.delta("1-3", text, ts)
    assert event.data_json == json.dumps({"text": text, "ts": ts})
    assert JobEvent.from_json(event.to_json()).data == {"text": text, "ts": ts}


@pytest.mark.parametrize("text", ["1-1", "0-1", "2-17", "12-345"])
def test_an_event_id_reads_back_as_written(text: str) -> None:
    assert str(EventId.parse(text)) == text


@pytest.mark.parametrize(
    "text",
    ["", "1", "1-", "-1", "1-2-3", "a-1", "1-b", " 1-2", "+1-2", "1_0-2", "\u00b2-1", "\u0661-1"],
)
def test_anything_else_is_not_an_event_id(text: str) -> None:
    with pytest.raises(ValueError):
        EventId.parse(text)


def test_event_ids_order_as_their_events_do() -> None:
    """Attempt first, then the sequence (numbers, not text: 1-10 after 1-9)."""
    ids = ["0-1", "1-1", "1-2", "1-9", "1-10", "2-1"]
    assert sorted(map(EventId.parse, reversed(ids))) == [EventId.parse(i) for i in ids]
    assert EventId.parse("0-1") > NO_EVENT and EventId(1, 9).next() == EventId(1, 10)


def test_an_event_in_another_json_shape_is_still_read() -> None:
    """JSON of the same event written another way (key order, spacing) is parsed in full;
    an unknown type is refused."""
    compact = '{"type":"delta","data":{"text":"x"},"id":"1-2"}'
    assert JobEvent.from_json(compact) == JobEvent("1-2", EventType.DELTA, {"text": "x"})
    with pytest.raises(ValueError):
        JobEvent.from_json('{"id": "1-2", "type": "nope", "data": {}}')


@pytest.mark.parametrize("protocol", [2, 3])
async def test_the_event_hub_reconnects_and_resubscribes_after_losing_redis(
    redis_client: Redis, protocol: int
) -> None:
    """Redis drops the hub's pub/sub connection (CLIENT KILL): the hub connects again,
    its subscriptions are renewed, and events published afterwards reach the subscriber.
    (The API's hub speaks RESP2; on RESP3 messages arrive as push notifications.)"""
    from api.streaming.event_hub import JobEventHub

    name = f"hub-reconnect-{secrets.token_hex(3)}"
    hub_redis = Redis.from_url(f"{REDIS_BASE}/14", protocol=protocol, client_name=name)
    hub = JobEventHub(hub_redis)
    await hub.start()
    stream = JobEventStream(redis_client, maxlen=1000, ttl_seconds=60)
    try:
        async with hub.subscribe("j-reconnect") as live:
            await stream.publish([("j-reconnect", JobEvent("1-1", EventType.DELTA, {"text": "a"}))])
            assert str((await asyncio.wait_for(live.get(), 5)).id) == "1-1"
            # Only this hub's connection (other deployments' hubs share the server).
            ids = [
                c["id"]
                for c in await redis_client.client_list(_type="pubsub")
                if c.get("name") == name
            ]
            assert len(ids) == 1
            await redis_client.client_kill_filter(_id=ids[0])

            async def delivered_after_reconnect() -> JobEvent:
                seq = 2
                while True:  # publish until the renewed subscription hears one
                    await stream.publish(
                        [("j-reconnect", JobEvent(f"1-{seq}", EventType.DELTA, {"text": "b"}))]
                    )
                    try:
                        return await asyncio.wait_for(live.get(), 0.2)
                    except TimeoutError:
                        seq += 1

            event = await asyncio.wait_for(delivered_after_reconnect(), 15)
            assert event.data == {"text": "b"}
            assert await redis_client.pubsub_numsub("ferry:job:j-reconnect:live") == [
                (b"ferry:job:j-reconnect:live", 1)
            ]
    finally:
        await hub.stop()
        await hub_redis.aclose()
