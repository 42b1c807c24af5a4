"""A tiny llama-architecture model with random weights and a BPE tokenizer trained on the spot, built
offline in about a second: the base model the fine-tune tests train and serve."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

# -- a tiny model, built offline ---------------------------------------------------------------------

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IM_START, IM_END)

# ChatML. The prompt with the generation prompt is a token prefix of the whole conversation, which is
# what mlx-lm's --mask-prompt needs to find where the answer starts.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _builtin_corpus(seed: int = 0, lines: int = 320) -> list[str]:
    """A few hundred lines of chat, prose, code and numbers: enough for a tokenizer to learn merges."""
    rng = random.Random(seed)
    subjects = ["the gateway", "a request", "the cache", "this model", "the router", "your team",
                "the fine-tune", "a user", "the database", "the log", "an adapter", "the server"]
    verbs = ["answers", "routes", "stores", "scores", "returns", "checks", "updates", "reads",
             "writes", "sends", "trains", "serves"]
    objects = ["the prompt", "a summary", "the ticket", "every hour", "the answer", "a token",
               "the status", "three rows", "the quality score", "a new version", "the config", "a report"]
    questions = ["What is the status of ticket {n}?", "Summarize the report for week {n}.",
                 "How do I reset my password?", "Translate 'good morning' to French.",
                 "Write a function that adds {n} to a number.", "Why did request {n} fail?",
                 "List three ways to cut cost.", "Explain the routing rule in one sentence."]
    answers = ["Ticket {n} is resolved.", "The report shows {n} requests and no errors.",
               "Open settings, choose security, then reset.", "Bonjour.",
               "def add(x):\n    return x + {n}", "It timed out after {n} ms and was retried.",
               "Cache answers, route to local models, and batch requests.",
               "Send each task type to the cheapest model that clears the bar."]
    code = ["import json", "from pathlib import Path", "for i in range({n}):", "    print(i, i * {n})",
            "if x > {n}:\n    return None", "SELECT id, ts FROM requests WHERE status = 200;",
            "def main() -> int:", "    return {n}", "class Router:", "    def route(self, request):"]
    out = []
    for i in range(lines):
        n = rng.randint(0, 9999)
        kind = i % 4
        if kind == 0:
            s = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}."
            out.append(s[0].upper() + s[1:])
        elif kind == 1:
            out.append(rng.choice(questions).format(n=n))
        elif kind == 2:
            out.append(rng.choice(answers).format(n=n))
        else:
            out.append(rng.choice(code).format(n=n))
    return out


def build_tiny_model(dest: Path, *, corpus: Sequence[str] | None = None, vocab_size: int = 512,
                     hidden_size: int = 64, layers: int = 2, heads: int = 4, seed: int = 0) -> Path:
    """Write a tiny llama-architecture model with random weights and its own tokenizer to `dest`.

    A byte-level BPE tokenizer trained on `corpus` (a built-in one by default) with pad, bos, eos and
    ChatML tokens, `<|im_end|>` as eos and a ChatML chat template; `mlx_lm.models.llama.Model` with
    seeded random weights, saved the way mlx-lm saves models. About 500 KB; it loads with
    `mlx_lm.load`, trains with `mlx_lm lora` and serves with `mlx_lm server`. Its answers are noise
    until it is trained.
    """
    import mlx.core as mx
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus) if corpus is not None else _builtin_corpus(seed), trainer)

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=IM_END, pad_token=PAD)
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(dest)
    # Newer transformers write their own class name and keep the template in a separate file; name
    # the portable class and keep the template inline too, so older transformers load it the same.
    tc_path = dest / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["chat_template"] = CHATML_TEMPLATE
    tc_path.write_text(json.dumps(tc, indent=2))

    config = {
        "model_type": "llama",
        "hidden_size": hidden_size,
        "num_hidden_layers": layers,
        "intermediate_size": 2 * hidden_size,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": tok.get_vocab_size(),
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "bos_token_id": fast.bos_token_id,
        "eos_token_id": fast.eos_token_id,
        "pad_token_id": fast.pad_token_id,
    }
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    save_model(dest, model)
    save_config(dict(config), dest / "config.json")
    return dest
