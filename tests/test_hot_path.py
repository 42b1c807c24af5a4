"""What the hot path's cheaper pieces must still guarantee: ids unique across forked workers, every row
of a batch redacted as if it were alone, and an exact cache filter of fixed size that never forgets."""

from __future__ import annotations

import hashlib
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


def test_the_exact_cache_filter_stays_the_same_size_however_many_requests_pass():
    # A replica holds the hashes answered within the cache's TTL so that a new request costs no query;
    # at 100 requests/s a day is 8.6 million hashes, and the filter must not grow with them.
    from tm_resources.cache import RecentHashes

    hashes = RecentHashes(86_400, lambda user: "u:" + user, capacity=20_000)
    hashes._loaded_at = datetime.now(UTC)  # as after the first read: `may_have` now consults the filter
    size = hashes.memory_bytes
    assert 20_000 <= size <= 80_000  # about 1.2 bytes a hash at a 1 % false positive rate, in each of two
    def digest(i: int) -> str:  # a request hash as cache.keys makes them (SHA-256, hex)
        return hashlib.sha256(str(i).encode()).hexdigest()

    sent = [digest(i) for i in range(20_000)]
    for h in sent:
        hashes.add(h, "alice")
    assert all(hashes.may_have(h, "alice") for h in sent)  # never a request it has seen said unseen
    unseen = [digest(i) for i in range(1_000_000, 1_020_000)]
    false_positives = sum(hashes.may_have(h, "alice") for h in unseen) / len(unseen)
    assert false_positives < 0.03
    # Another user's scope (scope per user here) has not seen alice's requests.
    assert sum(hashes.may_have(h, "bob") for h in sent) / len(sent) < 0.03
    for i in range(200_000):  # ten times its capacity: the same memory, more lookups, no misses
        hashes.add(digest(5_000_000 + i), "alice")
    assert hashes.memory_bytes == size
    assert all(hashes.may_have(h, "alice") for h in sent)
