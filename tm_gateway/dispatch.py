"""Agent dispatch: which configured agent answers a request, and the request as that agent sends it.

A request names an agent with the header `x-tm-agent: <name>` and is answered with that agent's
settings (`agents.<name>` in the configuration: model, system prompt, default parameters). A
request naming the dispatcher (`x-tm-agent: dispatcher`, the name is `dispatch.name`) is given to
the agent it matches best:

- by meaning: the prompt's nearest intents (each agent's example requests, embedded once when the
  `Dispatcher` is built) vote, as the loop's task types do (`tm_resources.tasks.TaskClassifier`:
  vectors centred on the intents' mean, each of the k nearest weighted exp((sim - best) / T));
- by keywords: each agent's share of the distinct keywords found in the prompt (whole words, any
  case, a plural -s/-es allowed), mixed in with weight `keyword_weight`.

The winner's confidence is its mixed share times the evidence that the prompt is about it at all:
the larger of its nearest intent's plain cosine similarity mapped linearly from `similarity_floor`
(nothing) to `similarity_full` (full), and 1 - 0.5**n for n keywords of its own found. A vote won
among agents the prompt is not close to (an off-topic prompt) so comes out unsure. Under
`min_confidence` the request goes to `fallback_agent`, or to no agent (None).

Everything here is pure (no I/O, no state after construction) and thread-safe. Beyond the one
embedding of the prompt (6-15 ms on 2 cores with the shared MiniLM embedder; none when the caller
passes the vector it already has), a decision over the shipped example's 4 agents, 39 intents and
~110 keywords took 0.15 ms at p50 for a short prompt and under 1 ms for a long one (keywords are
read from at most 2,000 characters, head and tail); tests/test_dispatch.py measures it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from tm_resources.config import AgentConfig, Config
from tm_resources.tasks import TaskClassifier

AGENT_HEADER = "x-tm-agent"

# Long prompts: only the head and the tail are read for keywords (instructions sit there; the middle
# of a pasted document adds time, not evidence; the embedding reads the first 128 tokens anyway).
_HEAD_CHARS = 1200
_TAIL_CHARS = 800
# A word: letters and digits, hyphenated parts kept together ("wi-fi", "two-factor", "2fa").
_WORD = re.compile(r"\w+(?:-\w+)*")


@dataclass(frozen=True)
class DispatchDecision:
    """The dispatcher's choice: `agent` is None when it is unsure and no fallback agent is configured.

    confidence: 0..1, compared with min_confidence; reason: one line for the request log;
    scores: each agent's mixed share of the vote (embedding and keywords), summing to 1 or all 0."""

    agent: str | None
    confidence: float
    reason: str
    scores: dict[str, float] = field(default_factory=dict)
    # False when the dispatcher was unsure (agent is then the fallback agent or None).
    confident: bool = False


class Dispatcher:
    """Classifies prompts to agents by their intents (embedding k-NN vote) and keywords.

    agents: name -> AgentConfig (only intents and keywords are read); embed: texts -> unit vectors,
    e.g. `get_embedder().embed`. Agents without intents can still win on keywords; agents with
    neither are only reached by name. Built with no intents at all it never calls `embed`.
    """

    def __init__(self, agents: Mapping[str, AgentConfig], embed: Callable[[list[str]], np.ndarray], *,
                 min_confidence: float = 0.35, fallback_agent: str | None = None, k: int = 10,
                 temperature: float = 0.05, keyword_weight: float = 0.4, similarity_floor: float = 0.1,
                 similarity_full: float = 0.35) -> None:
        if fallback_agent is not None and fallback_agent not in agents:
            raise ValueError(f"fallback_agent '{fallback_agent}' is not one of the agents")
        if not 0 <= keyword_weight <= 1 or not 0 <= min_confidence <= 1:
            raise ValueError("keyword_weight and min_confidence must be between 0 and 1")
        if similarity_full <= similarity_floor:
            raise ValueError("similarity_full must be above similarity_floor")
        self.embed = embed
        self.names = sorted(agents)
        self.min_confidence = min_confidence
        self.fallback_agent = fallback_agent
        self.keyword_weight = keyword_weight
        self.similarity_floor, self.similarity_full = similarity_floor, similarity_full
        # The k-NN vote over intents: the loop's task-type classifier, with agents as the types.
        # Labels carry a prefix so that no agent name can collide with its "unknown".
        intents = {f"agent:{n}": list(agents[n].intents) for n in self.names if agents[n].intents}
        # A stand-in with `embed` only (hence the ignore): the dispatcher classifies vectors, never texts.
        self._knn = (TaskClassifier(intents, SimpleNamespace(embed=embed), k=k,  # type: ignore[arg-type]
                                    temperature=temperature) if intents else None)
        self._knn_agents = [t.removeprefix("agent:") for t in self._knn.types] if self._knn else []
        self._intent_rows = [np.flatnonzero(self._knn.seed_labels == i) for i in range(len(self._knn_agents))] \
            if self._knn else []
        # Keywords as words: a prompt is read once into words with a dict lookup per word; phrases
        # are tried only where their first word appears. A keyword counts for each agent listing it.
        self._keyword_agents: dict[str, set[str]] = {}
        self._phrases: dict[str, list[tuple[str, ...]]] = {}
        for n in self.names:
            for kw in agents[n].keywords:
                words = tuple(_WORD.findall(kw.casefold()))
                if words:
                    self._keyword_agents.setdefault(" ".join(words), set()).add(n)
                if len(words) > 1 and words not in self._phrases.get(words[0], []):
                    self._phrases.setdefault(words[0], []).append(words)

    @classmethod
    def from_config(cls, config: Config, embed: Callable[[list[str]], np.ndarray], **tuning: Any) -> Dispatcher:
        """The dispatcher of `config.agents` with `config.dispatch`'s confidence bar and fallback agent."""
        return cls(config.agents, embed, min_confidence=config.dispatch.min_confidence,
                   fallback_agent=config.dispatch.fallback_agent, **tuning)

    def keywords_in(self, prompt: str) -> dict[str, list[str]]:
        """Each agent's distinct keywords found in the prompt (agents with none left out). Whole
        words in any case; the prompt's last word of a keyword may carry a plural -s or -es."""
        if not self._keyword_agents:
            return {}
        text = prompt if len(prompt) <= _HEAD_CHARS + _TAIL_CHARS else \
            f"{prompt[:_HEAD_CHARS]}\n{prompt[-_TAIL_CHARS:]}"
        words = _WORD.findall(text.casefold())
        found: dict[str, set[str]] = {}
        for i, word in enumerate(words):
            first = next((form for form in _singular(word) if form in self._keyword_agents), None)
            hits = [first] if first else []
            for phrase in self._phrases.get(word, ()):
                end = i + len(phrase)
                if end <= len(words) and tuple(words[i:end - 1]) == phrase[:-1] \
                        and phrase[-1] in _singular(words[end - 1]):
                    hits.append(" ".join(phrase))
            for kw in hits:
                for agent in self._keyword_agents.get(kw, ()):
                    found.setdefault(agent, set()).add(kw)
        return {a: sorted(kws) for a, kws in sorted(found.items())}

    def classify(self, prompt: str, vector: np.ndarray | None = None) -> DispatchDecision:
        """The agent for this prompt (the user's request). `vector`: the prompt's embedding by the
        same model, when the caller has it already (saves the one embedding)."""
        if not prompt.strip():
            return self._unsure(0.0, "an empty prompt", {})
        keywords = self.keywords_in(prompt)
        if self._knn is None and not keywords:
            return self._unsure(0.0, "no intent or keyword of any agent to go by", {})

        vote = dict.fromkeys(self.names, 0.0)
        nearest: dict[str, tuple[float, str]] = {}
        if self._knn is not None:
            vec = np.asarray(self.embed([prompt])[0] if vector is None else vector, dtype=np.float32)
            shares = self._knn.votes(vec[None, :])[0]
            sims = self._knn.seed_vecs @ vec
            for i, agent in enumerate(self._knn_agents):
                vote[agent] = float(shares[i])
                own = self._intent_rows[i]
                best = own[int(np.argmax(sims[own]))]
                nearest[agent] = (float(sims[best]), self._knn.seed_texts[best])

        found = sum(len(kws) for kws in keywords.values())
        # Each keyword found weighs in with keyword_weight: 1 - (1 - keyword_weight) ** found in all.
        w = 1 - (1 - self.keyword_weight) ** found if self._knn is not None else float(found > 0)
        scores = {a: (1 - w) * vote[a] + w * (len(keywords.get(a, ())) / found if found else 0.0)
                  for a in self.names}
        # Ties go to the agent first in name order: deterministic whatever the configuration's order.
        winner = max(self.names, key=lambda a: (scores[a], -self.names.index(a)))
        similarity = nearest.get(winner, (0.0, ""))[0]
        closeness = min(1.0, max(0.0, (similarity - self.similarity_floor)
                                 / (self.similarity_full - self.similarity_floor)))
        evidence = max(closeness, 1 - 0.5 ** len(keywords.get(winner, ())))
        confidence = round(scores[winner] * evidence, 4)
        rounded = {a: round(s, 4) for a, s in scores.items()}

        why = [f"{scores[winner]:.0%} of the vote"]
        if winner in nearest:
            why.append(f"nearest intent {nearest[winner][1]!r} (similarity {similarity:.2f})")
        if winner in keywords:
            why.append(f"keywords: {', '.join(keywords[winner])}")
        summary = f"{winner}: " + "; ".join(why)
        if confidence < self.min_confidence:
            return self._unsure(confidence, f"best guess {summary}, confidence {confidence:.2f}", rounded)
        return DispatchDecision(winner, confidence, f"{summary}; confidence {confidence:.2f}", rounded, True)

    def _unsure(self, confidence: float, why: str, scores: dict[str, float]) -> DispatchDecision:
        to = f"the fallback agent {self.fallback_agent}" if self.fallback_agent else "no agent"
        return DispatchDecision(self.fallback_agent, confidence,
                                f"unsure ({why}, under {self.min_confidence:.2f}): {to}", scores)


def _singular(word: str) -> list[str]:
    """The word and the forms it may have without a plural ending, most likely first."""
    forms = [word]
    if word.endswith("es"):
        forms.append(word[:-2])
    if word.endswith("s"):
        forms.append(word[:-1])
    return forms


def resolve_agent(header_value: str | None, config: Config) -> tuple[str | None, bool]:
    """What the `x-tm-agent` header asks for: (agent name or None, whether to dispatch).

    No header (or a blank one): (None, False). The dispatcher's name (`dispatch.name`, any case):
    (None, True): classify the prompt with `Dispatcher.classify`. Any other value: (value, False),
    also when it is not a configured agent (it is still logged; `config.agents.get(name)` is then
    None and the request is answered without agent settings)."""
    value = (header_value or "").strip()
    if not value:
        return None, False
    if value.casefold() == config.dispatch.name.casefold():
        return None, True
    return value, False


# Per wire format: the agent parameters the format has, the field each goes in, and the fields
# that, when the request sets any of them, mean the client chose that parameter itself.
_FIELDS: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    "openai": {
        "temperature": ("temperature", ()),
        "top_p": ("top_p", ()),
        "max_tokens": ("max_tokens", ("max_completion_tokens",)),
        "stop": ("stop", ()),
        "presence_penalty": ("presence_penalty", ()),
        "frequency_penalty": ("frequency_penalty", ()),
        "seed": ("seed", ()),
    },
    "anthropic": {
        # Recent Claude models refuse temperature and top_p together: one set (by the client, or
        # by the agent's params, first in their order) stands for both.
        "temperature": ("temperature", ("top_p",)),
        "top_p": ("top_p", ("temperature",)),
        "top_k": ("top_k", ()),
        "max_tokens": ("max_tokens", ()),
        "stop": ("stop_sequences", ()),
    },
}
# Extended thinking fixes the sampling parameters (Anthropic refuses them with thinking on).
_NOT_WITH_THINKING = frozenset(("temperature", "top_p", "top_k"))
_THINKING_OFF = (None, "disabled")


def apply_agent(body: dict, fmt: str, agent: AgentConfig) -> dict:
    """The request body as `agent` sends it; `body` itself is left unchanged.

    fmt: the body's wire format, "openai" (chat completions) or "anthropic" (messages).
    The agent's system prompt goes first, the client's own system text after it: OpenAI, merged
    into a first `system` message or a new one put first; Anthropic, the `system` field (a string
    stays a string, a list of blocks gets a text block first). Its default parameters fill those
    the request does not set (None counts as not set); those the format lacks are left out, and
    so are temperature, top_p and top_k under Anthropic's extended thinking."""
    if fmt not in _FIELDS:
        raise ValueError(f"unknown request format {fmt!r}: expected 'openai' or 'anthropic'")
    out = dict(body)
    if agent.system:
        if fmt == "openai":
            out["messages"] = _openai_with_system(list(body.get("messages") or []), agent.system)
        else:
            out["system"] = _anthropic_with_system(body.get("system"), agent.system)
    thinking = fmt == "anthropic" and isinstance(body.get("thinking"), dict) \
        and body["thinking"].get("type") not in _THINKING_OFF
    for name, value in agent.params.items():
        if name not in _FIELDS[fmt] or (thinking and name in _NOT_WITH_THINKING):
            continue
        key, also = _FIELDS[fmt][name]
        if any(out.get(k) is not None for k in (key, *also)):
            continue
        out[key] = [value] if key == "stop_sequences" and isinstance(value, str) else value
    return out


def _openai_with_system(messages: list, system: str) -> list:
    first = messages[0] if messages else None
    if isinstance(first, dict) and first.get("role") == "system":
        content = first.get("content")
        if isinstance(content, str):
            merged: Any = f"{system}\n\n{content}" if content else system
            return [{**first, "content": merged}, *messages[1:]]
        if isinstance(content, list):
            return [{**first, "content": [{"type": "text", "text": system}, *content]}, *messages[1:]]
    return [{"role": "system", "content": system}, *messages]


def _anthropic_with_system(current: Any, system: str) -> str | list:
    if isinstance(current, list):
        return [{"type": "text", "text": system}, *current]
    if isinstance(current, str) and current:
        return f"{system}\n\n{current}"
    return system
