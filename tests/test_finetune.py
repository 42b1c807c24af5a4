"""The fine-tune runner for real: a tiny model built on the spot, redacted and leak-free training data,
mlx-lm LoRA training, base-vs-adapter evaluation, generation, and mlx_lm.server answering the
official OpenAI SDK. No mocks; the whole file runs in well under two minutes on two CPU cores."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections import defaultdict
from pathlib import Path

import openai
import pytest

from tests import tiny_model as tiny
from tm_assets import finetune as ft
from tm_resources.redact import redact

# -- data: one narrow, repetitive pattern (a support desk answering ticket-status questions) ---------

# (ticket, customer, product, status, session): hand-written rows; the first ten are conversations,
# so their three prompts share a session and must land in one split together.
TICKETS = [
    (4821, "ann.lee@example.com", "billing", "resolved", "sess-a1"),
    (4822, "bob@corp.example", "login", "open", "sess-a2"),
    (4830, "cleo.r@example.org", "export", "waiting on the customer", "sess-a3"),
    (4847, "dev+ops@example.net", "billing", "resolved", "sess-a4"),
    (4852, "eve@example.com", "api", "escalated", "sess-a5"),
    (4866, "finn.o@example.co.uk", "login", "resolved", "sess-a6"),
    (4871, "gus@example.io", "dashboard", "open", "sess-a7"),
    (4888, "hana.k@example.com", "export", "resolved", "sess-a8"),
    (4893, "ivo@example.de", "api", "waiting on the customer", "sess-a9"),
    (4901, "jun.w@example.com", "billing", "escalated", "sess-a10"),
    (4915, "kai@example.com", "dashboard", "resolved", None),
    (4920, "lena.m@example.org", "api", "open", None),
    (4933, "milo@example.net", "login", "resolved", None),
    (4947, "nia.b@example.com", "billing", "open", None),
    (4958, "omar@example.io", "export", "escalated", None),
    (4962, "pia.s@example.com", "dashboard", "waiting on the customer", None),
    (4979, "quinn@example.org", "api", "resolved", None),
    (4984, "rosa.t@example.com", "login", "escalated", None),
    (4996, "sam@example.net", "billing", "resolved", None),
    (5003, "tess.v@example.com", "export", "open", None),
]
API_KEY = "sk-proj-Q7fT2mX9kL4pR8sV1wY6zB3nC5dH0jAa"
GITHUB_TOKEN = "ghp_8Kd2LmQ9rT4vX7zA1bC3eF5gH6jN0pS2uW4y"


def ticket_examples() -> list[dict]:
    examples = []
    for i, (ticket, email, product, status, session) in enumerate(TICKETS):
        answer = f"Ticket {ticket} ({product}) is {status}. We will write to {email} when it changes."
        prompts = [
            f"What is the status of ticket {ticket}?",
            f"Ticket {ticket} from {email}: any update on the {product} issue?",
            (f"Can you check ticket {ticket}? The {product} page rejects my key {API_KEY}." if i % 3 == 0
             else f"Please look at ticket {ticket}, I pushed a fix with token {GITHUB_TOKEN}." if i % 3 == 1
             else f"Any news on ticket {ticket}? Call me on +1 (415) 555-0{100 + i}."),
        ]
        for j, prompt in enumerate(prompts):
            examples.append({"prompt": prompt, "answer": answer, "request_id": f"r{i}-{j}",
                             "user_id": "ann", "session_id": session})
    return examples


def read_messages(data_dir: Path) -> dict[str, list[list[dict]]]:
    return {s: [row["messages"] for row in ft.read_split(data_dir, s)] for s in ft.SPLITS}


# -- redaction ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, secret, placeholder", [
    ("Contact ann.lee+billing@example.co.uk for access.", "ann.lee+billing@example.co.uk", "[EMAIL]"),
    ("export OPENAI_API_KEY=sk-proj-AbC123dEf456GhI789jKl012MnO345pQr", "sk-proj-AbC123dEf456", "[SECRET]"),
    ("my key is sk-ant-api03-Zx8Yw7Vu6Ts5Rq4Po3Nm2Lk1Ji0HgFeDcBa-abcd", "Zx8Yw7Vu6Ts5", "[SECRET]"),
    ("use sk-ant-test-0123456789abcdef against the fake", "0123456789abcdef", "[SECRET]"),
    ("gateway key tm-Q2x9_kLmN3pR8sT1vW4yZ6aB0cD5eF7gH9jK2mNo", "Q2x9_kLmN3pR8s", "[SECRET]"),
    ("git clone https://ghp_1234567890abcdefghijABCDEFGHIJ123456@github.com/org/repo", "ghp_12345", "[SECRET]"),
    ("keys AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE", "[SECRET]"),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI", "[SECRET]"),
    ("curl -H 'Authorization: Bearer abcdef0123456789abcdef0123' http://x", "abcdef0123456789", "[SECRET]"),
    ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNz", "[SECRET]"),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
     "eyJhbGciOiJIUzI1NiJ9", "[SECRET]"),
    ("signing secret 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "9f86d0818", "[SECRET]"),
    ("blob: Zm9vYmFyQmF6UXV4MTIzNDU2Nzg5MEFiQ2RFZkdoSWpLbE1u", "Zm9vYmFyQmF6", "[SECRET]"),
    ('settings = {"password": "hunter2!", "api_key": "abc123xyz"}', "hunter2!", "[SECRET]"),
    ("DB_PASSWORD=s3cretPass", "s3cretPass", "[SECRET]"),
    ("DATABASE_URL=postgres://app:s3cr3tP4ss@db.internal:5432/app", "s3cr3tP4ss", "[SECRET]"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----", "MIIEow", "[SECRET]"),
    ("slack bot xoxb-123456789012-abcdefABCDEF", "xoxb-1234", "[SECRET]"),
    ("Call me at +1 (415) 555-0132 tomorrow.", "555-0132", "[PHONE]"),
    ("office 415-555-0199", "415-555-0199", "[PHONE]"),
    ("London +44 20 7946 0958", "7946 0958", "[PHONE]"),
    ("the box at 10.0.12.34 is down", "10.0.12.34", "[IP]"),
    ("client 2001:db8:85a3::8a2e:370:7334 connected", "8a2e:370:7334", "[IP]"),
    ("pay with 4111 1111 1111 1111", "4111 1111", "[CARD]"),
])
def test_redact_removes_secrets_and_personal_data(text, secret, placeholder):
    out = redact(text)
    assert secret not in out
    assert placeholder in out
    assert redact(out) == out  # idempotent


@pytest.mark.parametrize("text", [
    "def login(password: str, token: str | None = None):\n    token = get_token(password)\n    return token",
    "max_tokens = 512\nnum_tokens: 1024\nclient = Client(api_key=api_key)",
    "The release is on 2024-01-15 at 12:30:45: version 1.2.3, pi 3.14159, total 1,234,567 rows.",
    "ts = 1700000000000  # ms; n = 12345678; id = 550e8400-e29b-41d4-a716-446655440000",
    "std::vector<int> v; a::b(); x = y + 42 * (z - 7) % 1000",
    "pip install numpy==2.4.6 torch==2.13.0 and serve on 127.0.0.1:8080 or 0.0.0.0; HTTP 404",
    "sk-learn and tm-gateway-configuration-file are just names",
    "getUserProfileSettingsForAccountId2 calls test_export_dataset_splits_without_leakage_2",
    "@property\ndef name(self) -> str:\n    return self._name",
    "SELECT id, cost_usd FROM requests WHERE status = 200 AND cost_usd > 0.005 LIMIT 50;",
    "mask 255.255.255.0, Python 3.11.4, call 911 or ext. 4412",
    "It needs a basic understanding of HTTP: Basic Authentication and bearer tokens.",
])
def test_redact_leaves_ordinary_code_and_numbers_alone(text):
    assert redact(text) == text


# -- export and validation ---------------------------------------------------------------------------

def test_export_splits_without_leakage_and_redacts(tmp_path: Path):
    examples = ticket_examples()
    # The same question again in another conversation, and once more in other words and case:
    # all three must follow their original into the same split.
    examples.append({**examples[0], "request_id": "dup1", "session_id": "sess-other",
                     "answer": "Ticket 4821 (billing) is resolved."})
    examples.append({**examples[0], "request_id": "dup2", "session_id": None,
                     "prompt": "what is the STATUS of ticket 4821 ??"})
    examples.append({**examples[1], "request_id": "same"})  # an exact duplicate: dropped
    examples.append({"prompt": "  ", "answer": "nothing asked", "request_id": "empty"})

    info = ft.export_dataset(examples, tmp_path / "data")

    assert info.total == len(examples) - 2
    assert info.dropped_duplicates == 1 and info.dropped_empty == 1
    assert all(info.counts[s] > 0 for s in ft.SPLITS)
    assert info.counts["train"] > info.counts["valid"] + info.counts["test"]
    assert info.redacted == 61  # every answer but the short one names an email
    assert ft.validate_dataset(tmp_path / "data") == []

    split_of_prompt = {}
    for split, convs in read_messages(tmp_path / "data").items():
        for messages in convs:
            assert [m["role"] for m in messages] == ["user", "assistant"]
            split_of_prompt[messages[0]["content"]] = split
            text = json.dumps(messages)
            assert "@example" not in text and API_KEY not in text and GITHUB_TOKEN not in text
            assert "555-0" not in text
    by_session = defaultdict(set)
    for ex in ticket_examples():
        if ex["session_id"]:
            by_session[ex["session_id"]].add(split_of_prompt[redact(ex["prompt"])])
    assert all(len(splits) == 1 for splits in by_session.values())
    assert split_of_prompt["what is the STATUS of ticket 4821 ??"] == split_of_prompt[examples[0]["prompt"]]

    # Stable: the same data splits the same way, whatever order it comes in.
    again = ft.export_dataset(list(reversed(examples)), tmp_path / "again")
    assert again.counts == info.counts
    for split in ft.SPLITS:
        assert (sorted(map(json.dumps, read_messages(tmp_path / "again")[split]))
                == sorted(map(json.dumps, read_messages(tmp_path / "data")[split])))


def test_export_fills_every_split_from_the_minimum(tmp_path: Path):
    three = [{"prompt": f"question {i}", "answer": f"answer {i}", "request_id": str(i)} for i in range(3)]
    info = ft.export_dataset(three, tmp_path / "three")
    assert info.counts == {"train": 1, "valid": 1, "test": 1}
    assert ft.validate_dataset(tmp_path / "three") == []

    ft.export_dataset(three[:2], tmp_path / "two")
    problems = ft.validate_dataset(tmp_path / "two")
    assert any("valid.jsonl has 0 examples" in p for p in problems)
    assert any("test.jsonl has 0 examples" in p for p in problems)


def test_validate_dataset_reports_format_leaks_and_secrets(tmp_path: Path):
    def chat(prompt: str, answer: str = "ok") -> str:
        return json.dumps({"messages": [{"role": "user", "content": prompt},
                                        {"role": "assistant", "content": answer}]})

    d = tmp_path / "bad"
    d.mkdir()
    (d / "train.jsonl").write_text("\n".join([
        chat("How do I rotate keys?"),
        "{not json",
        json.dumps({"text": "plain text"}),
        json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
        json.dumps({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
        chat("Mail me at zoe@example.com"),
    ]) + "\n")
    (d / "valid.jsonl").write_text(chat("how do i rotate KEYS") + "\n")
    problems = ft.validate_dataset(d, min_examples=2)

    def has(*words):
        return any(all(w in p for w in words) for p in problems)

    assert has("train.jsonl line 2", "not JSON")
    assert has("train.jsonl line 3", "no 'messages'")
    assert has("train.jsonl line 4", "must end with the assistant")
    assert has("train.jsonl line 5", "known role")
    assert has("train.jsonl line 6", "redaction")
    assert has("valid.jsonl has 1 examples, fewer than 2")
    assert has("test.jsonl is missing")
    assert has("leak", "train.jsonl line 1", "valid.jsonl line 1")


# -- the real thing: a tiny model, trained, evaluated, served ----------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    started = time.perf_counter()
    path = tiny.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    print(f"\ntiny model built in {time.perf_counter() - started:.1f} s")
    return path


@pytest.fixture(scope="module")
def dataset(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("data")
    ft.export_dataset(ticket_examples(), data)
    assert ft.validate_dataset(data, min_examples=4) == []
    return data


@pytest.fixture(scope="module")
def trained(tiny_model: Path, dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    lines: list[str] = []
    result = ft.train_lora(tiny_model, dataset, tmp_path_factory.mktemp("adapter"), iters=30, rank=4,
                           num_layers=-1, learning_rate=1e-3, batch_size=4, on_line=lines.append,
                           timeout_s=300)
    print(f"\nLoRA: 30 iterations in {result.seconds:.1f} s on {result.device}")
    return result, lines


@pytest.mark.slow  # MLX: builds, trains or serves a model
def test_tiny_model_is_small_and_chat_ready(tiny_model: Path):
    from transformers import AutoTokenizer

    size = sum(f.stat().st_size for f in tiny_model.iterdir())
    assert size < 1_000_000
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 2
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert tok.eos_token == tiny.IM_END and tok.pad_token == tiny.PAD
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_ids_to_tokens(tok.encode(text))[0] == tiny.IM_START


@pytest.mark.slow  # MLX: builds, trains or serves a model
def test_mlx_device_is_cpu_here():
    assert ft.mlx_device() in ("cpu", "gpu")
    import platform
    if platform.system() == "Linux":
        assert ft.mlx_device() == "cpu"


@pytest.mark.slow  # MLX: builds, trains or serves a model
def test_train_lora_streams_output_and_reports_losses(trained):
    result, lines = trained
    assert any("Trainable parameters" in line for line in lines)
    assert any("rank 4" in line for line in lines)          # the YAML config's lora_parameters took
    assert (result.adapter_path / "adapters.safetensors").exists()
    saved = json.loads((result.adapter_path / "adapter_config.json").read_text())
    assert saved["lora_parameters"]["rank"] == 4 and saved["num_layers"] == 2  # -1 means all layers
    assert [it for it, _ in result.train_losses][-1] == 30
    assert result.val_losses[0][0] == 1 and result.val_losses[-1][0] == 30
    assert result.final_train_loss < result.train_losses[0][1]
    assert result.final_val_loss < result.val_losses[0][1]
    assert result.command.startswith("python -m mlx_lm lora --config ")


@pytest.mark.slow  # MLX: builds, trains or serves a model
def test_adapter_beats_base_on_held_out_tickets(tiny_model: Path, dataset: Path, trained):
    result, _ = trained
    base = ft.evaluate(tiny_model, dataset, None)
    tuned = ft.evaluate(tiny_model, dataset, result.adapter_path)
    print(f"\ntest loss: base {base.loss:.3f} ({base.seconds:.1f} s), adapter {tuned.loss:.3f} ({tuned.seconds:.1f} s)")
    assert base.examples == tuned.examples == len(ft.read_split(dataset, "test"))
    assert tuned.loss < base.loss - 1.0
    assert tuned.perplexity < base.perplexity


@pytest.mark.slow  # MLX: builds, trains or serves a model
def test_generate_answers_follows_the_trained_pattern(tiny_model: Path, dataset: Path, trained):
    result, _ = trained
    held_out = ft.held_out_examples(dataset)
    prompts = ["What is the status of ticket 5100?"] + [conversation for conversation, _ in held_out]
    tuned = ft.generate_answers(tiny_model, result.adapter_path, prompts, max_tokens=24)
    base = ft.generate_answers(tiny_model, None, prompts[:1], max_tokens=24)
    assert len(tuned) == len(prompts)
    assert all(answer.startswith("Ticket") for answer in tuned)
    assert not base[0].startswith("Ticket")


@pytest.mark.slow  # MLX: builds, trains or serves a model
def test_failed_training_raises_with_the_output_tail(tmp_path: Path, tiny_model: Path, dataset: Path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(ft.FinetuneError) as err:
        ft.train_lora(broken, dataset, tmp_path / "adapter", iters=2, timeout_s=120)
    assert "LoRA training failed" in str(err.value)
    assert "Traceback" in err.value.output_tail

    started = time.perf_counter()
    with pytest.raises(ft.FinetuneError, match="took longer than 1 s"):
        ft.train_lora(tiny_model, dataset, tmp_path / "slow", iters=10_000, timeout_s=1)
    assert time.perf_counter() - started < 5


def test_losses_parse_from_old_and_new_mlx_lm_output():
    new = ["  iter   train_loss     tok/s     tokens", "     1    val 6.662    0.05s",
           "    10    2.448 ▼    1,701      1.4k", "    20    2.503 ▲    1,690      2.8k",
           "    20    val 2.012    0.08s"]
    old = ["Iter 1: Val loss 6.662, Val took 0.050s",
           "Iter 10: Train loss 2.448, Learning Rate 1.000e-03, It/sec 3.1, Tokens/sec 1701.0, "
           "Trained Tokens 1400, Peak mem 0.1 GB", "Iter 20: Train loss 2.503, Learning Rate 1.000e-03",
           "Iter 20: Val loss 2.012, Val took 0.080s"]
    for lines in (new, old):
        assert ft.parse_losses(lines) == ([(10, 2.448), (20, 2.503)], [(1, 6.662), (20, 2.012)])


@pytest.mark.slow  # MLX: builds, trains or serves a model
def test_model_server_answers_the_openai_sdk(tiny_model: Path, trained):
    result, _ = trained
    # Background processes here may start with SIGINT/SIGTERM ignored; the child must stop anyway.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        server = ft.ModelServer(tiny_model, result.adapter_path).start()
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
    with server:
        print(f"\nmlx_lm server ready in {server.ready_seconds:.1f} s")
        assert server.url == f"http://127.0.0.1:{server.port}/v1"
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model=ft.ModelServer.UPSTREAM_MODEL, max_tokens=24, temperature=0,
            messages=[{"role": "user", "content": "What is the status of ticket 5100?"}])
        assert reply.choices[0].message.content.startswith("Ticket")  # the adapter answers
        assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
        process = server.process
        started = time.perf_counter()
        server.stop()
        # It stopped on SIGINT well within the grace period, not killed after it.
        assert time.perf_counter() - started < 5 and process.returncode != -signal.SIGKILL
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1)
