"""What the hot path's cheaper pieces must still guarantee: ids unique across forked workers, and every
row of a batch redacted as if it were alone."""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime

import orjson
import psycopg

from tm_gateway.ids import uuid7
from tm_gateway.requestlog import RequestLog


def test_request_ids_are_time_ordered_uuid7_and_unique_in_forked_workers():
    first = uuid7()  # the parent holds a block of random bits now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker forked by the server: its ids must not repeat its parent's
        os.close(read)
        os.write(write, b"".join(uuid7().bytes for _ in range(200)))
        os._exit(0)
    os.close(write)
    mine = [uuid7() for _ in range(200)]
    data = b""
    while chunk := os.read(read, 65536):
        data += chunk
    os.close(read)
    os.waitpid(pid, 0)
    theirs = [uuid.UUID(bytes=data[i:i + 16]) for i in range(0, len(data), 16)]
    assert len(theirs) == 200
    everyone = [first, *mine, *theirs]
    # Compared on their random bits alone: the same bits in another millisecond would still be a repeat.
    random_bits = {u.int & ((1 << 76) - 1) & ~(0b11 << 62) for u in everyone}
    assert len(random_bits) == len(everyone)
    for u in everyone:
        assert u.version == 7 and u.variant == uuid.RFC_4122 and uuid.UUID(str(u)) == u
    assert sorted(mine, key=lambda u: u.int >> 80) == mine  # the millisecond leads: ids sort by time
    assert abs((mine[-1].int >> 80) / 1000 - datetime.now(UTC).timestamp()) < 5


def test_rows_of_one_batch_are_each_redacted_as_if_alone(db_url, tmp_path):
    secret = "sk-proj-" + "Qw3rTy7U" * 5
    system = f"You run our deploys; the key is {secret}."
    rows = []
    for i in range(6):
        prompt = f"deploy {i} with {secret}" if i % 2 else f"deploy {i}, nothing secret here"
        messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        rows.append({"id": uuid7(), "ts": datetime.now(UTC), "user_id": "u1", "api_format": "openai",
                     "endpoint": "/v1/chat/completions", "status": 200, "system": system, "prompt": prompt,
                     "messages": orjson.dumps(messages).decode(), "response_text": f"done {i}"})
    plain = dict(rows[0], id=uuid7(), system="no secrets", messages='[{"role": "user",  "content": "hi"}]')
    log = RequestLog(db_url, spool_dir=tmp_path / "spool", redact_secrets=True, flush_interval_s=0.5).start()
    for r in [*rows, plain]:
        log.write(r)
    assert log.flush()
    log.close()
    with psycopg.connect(db_url) as conn:
        stored = {r[0]: r[1:] for r in conn.execute(
            "SELECT id, system, prompt, messages::text, response_text FROM requests").fetchall()}
    assert len(stored) == 7
    for i, r in enumerate(rows):
        system_, prompt, messages, answer = stored[r["id"]]
        assert system_ == "You run our deploys; the key is [SECRET]."
        assert prompt == (f"deploy {i} with [SECRET]" if i % 2 else f"deploy {i}, nothing secret here")
        assert orjson.loads(messages) == [{"role": "system", "content": system_}, {"role": "user", "content": prompt}]
        assert answer == f"done {i}"
    assert orjson.loads(stored[plain["id"]][2]) == [{"role": "user", "content": "hi"}]
