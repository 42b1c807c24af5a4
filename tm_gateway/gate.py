"""The cascade's quick quality gate: is a cheap model's answer plainly unusable, so the frontier must answer?

It catches what can be seen without a judge: an empty answer, a refusal, an answer cut off (by the
token limit, mid-sentence, or inside a code fence), the wrong format (JSON asked but not
parseable, code asked but none given) and explicit constraints of the prompt left unmet (bullet
counts, word limits, one word, yes or no, one of the listed choices). It never guesses whether an
answer is *right*: a gate that fails good answers costs a frontier call each time, so every check
fires only on a clear signal. Pure, deterministic, regexes compiled once: well under 1 ms.
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple

from tm_resources.code_ask import asks_for_code


class GateVerdict(NamedTuple):
    passed: bool
    reasons: list[str]


# Refusals open the answer; looking only at its start keeps code that prints "I can't" from failing.
_REFUSAL_WINDOW = 240
_REFUSAL = re.compile(
    r"^\W*(?:"
    r"(?:i'?m|i am)\s+(?:so\s+)?sorry,?\s+(?:but\s+)?(?:i|as an ai)"
    r"|i\s+(?:apologi[sz]e|regret),?\s+but"
    r"|i\s+(?:can(?:no|')t|cannot|won'?t|will not|am unable to|'m unable to|am not able to|'m not able to)"
    r"\s+(?:help|assist|comply|provide|do that|fulfil|answer|create|write|generate|support|engage|share|complete)"
    r"|i\s+do(?:n'?t| not)\s+feel\s+comfortable"
    r"|unfortunately,?\s+i\s+(?:can(?:no|')t|cannot|am unable|'m unable|am not able|'m not able|won'?t"
    r"|do(?:n'?t| not)\s+(?:have|feel))"
    r"|as an ai\b|as a language model\b|as an? (?:large )?language model\b"
    r"|(?:sorry|apologies),?\s+(?:but\s+)?i\s+(?:can(?:no|')t|cannot|am unable|'m unable)"
    r"|that(?:'s| is)\s+not\s+something\s+i\s+can"
    r")",
    re.IGNORECASE,
)
_FENCE = re.compile(r"^\s*(```|~~~)", re.MULTILINE)
_LIST_OR_BLOCK = re.compile(r"^\s*(?:[-*+•]|\d+[.)]|#|\||>|```|~~~)")
# Prose that stops on a comma, a colon, an opening bracket, a dash or a word that cannot end a
# sentence. A plain lowercase word is not enough: "... of the input list" often ends a complete note.
_DANGLING = re.compile(r"(?:[,;:(\[{–—]|\s-|\b(?:the|a|an|and|or|but|of|to|with|for|in|on|at|by|from|as|that|which"
                       r"|who|is|are|was|were|be|will|can|could|would|should|this|these|its|their|your|our|my|if"
                       r"|because|than|then|when|while|into|such|very|not|also))\s*$")
_CODE_CHARS = re.compile(r"[#=(){}\[\]<>_`|\\/*]")

# What the prompt asks for. Kept narrow: a false "JSON asked" would fail every good prose answer.
_ASKS_JSON = re.compile(
    r"\b(?:(?:as|in|into|return|returns|output|respond with|reply with|give me|valid|only|format(?:ted)? as"
    r"|json (?:object|array|format|output|schema)|formatted)\s+(?:a\s+|an\s+|the\s+|valid\s+|strict\s+)*json\b"
    r"|json\s+(?:object|array|only|format|output)\b)",
    re.IGNORECASE,
)
_CODE_SIGNS = re.compile(
    r"```|~~~|^(?: {4}|\t)\S"
    r"|^\s*(?:def|class|function|fn|func|public|private|static|import|from\s+\S+\s+import|#include|package|using"
    r"|const|let|var|return|SELECT|INSERT|UPDATE|CREATE|for|while|if)\b.*(?:[:;{(=]|$)"
    r"|[;{}]\s*$|=>|\w+\([^()\n]*\)\s*[:{]",
    re.MULTILINE,
)

_NUM_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
              "ten": 10, "a single": 1, "single": 1}
_NUM = r"(\d+|one|two|three|four|five|six|seven|eight|nine|ten|a single|single)"
_BULLETS_ASKED = re.compile(rf"\b(?:in|with|as|into|give me|list|exactly)\s+(?:exactly\s+)?{_NUM}"
                            r"\s+bullet(?:\s*points?|s)\b", re.IGNORECASE)
_BULLET_LINE = re.compile(r"^\s*(?:[-*+•]|\d+[.)])\s+\S", re.MULTILINE)
_MAX_WORDS = re.compile(r"\b(?:under|fewer than|less than|at most|no more than|maximum of|max(?:imum)?|within"
                        rf"|not exceeding|up to)\s+{_NUM}\s+words?\b", re.IGNORECASE)
_EXACT_WORDS = re.compile(rf"\b(?:in|exactly|using|with)\s+(?:exactly\s+)?{_NUM}\s+words?\b", re.IGNORECASE)
_MAX_SENTENCES = re.compile(r"\b(?:in|under|at most|no more than|fewer than|less than|exactly|using)"
                            rf"\s+{_NUM}\s+sentences?\b", re.IGNORECASE)
_YES_NO = re.compile(r"\b(?:answer|reply|respond|say)(?:\s+(?:only|just|with|simply))*"
                     r"\s+(?:with\s+)?[\"']?yes[\"']?\s+or\s+[\"']?no\b"
                     r"|\b(?:yes or no only|only yes or no|just yes or no)\b|\(yes/no\)|\byes/no answer\b",
                     re.IGNORECASE)
_ONE_WORD = re.compile(r"\b(?:in|with|using|answer in|reply in|respond in)"
                       r"\s+(?:just\s+|only\s+)?(?:one|a single)\s+word\b"
                       r"|\bone[- ]word (?:answer|reply|response)\b",
                       re.IGNORECASE)
# "Print only a single choice from "A" or "B" or "C"", "answer with the letter": one of the listed options.
_CHOICE_ASKED = re.compile(
    r"\b(?:only|single|one)\s+(?:a\s+single\s+)?(?:choice|letter|option)\b[^\n]{0,20}?\bfrom\b(?P<opts>[^\n]{0,80})"
    r"|\banswer with (?:the|a|one|only the)\s+letter\b",
    re.IGNORECASE,
)
_QUOTED_OPTION = re.compile(r"[\"'“‘]([A-Za-z0-9])[\"'”’]")
_OPTION_LINE = re.compile(r"^\s*\(?([A-Ha-h])[).:]\s+\S", re.MULTILINE)
_LEADING_CHOICE = re.compile(r"^\W*(?:answer\s*:?\s*|the answer is\s*:?\s*|option\s+)?\(?([A-Za-z0-9])(?:[).:\s]|$)",
                             re.IGNORECASE)
_WORD = re.compile(r"[\w'’-]+")
_SENTENCE_END = re.compile(r"[.!?](?:[\"')\]]*)(?:\s+|$)")


def _number(text: str) -> int:
    return int(text) if text.isdigit() else _NUM_WORDS[text.lower()]


def _is_json(answer: str) -> bool:
    text = answer.strip()
    fenced = re.search(r"```(?:json)?\s*\n(.*?)```", text, re.DOTALL | re.IGNORECASE)
    candidates = [fenced.group(1)] if fenced else []
    candidates.append(text)
    # A short preamble ("Here is the JSON:") before the value is common and harmless.
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if starts:
        candidates.append(text[min(starts):])
    decoder = json.JSONDecoder()
    for c in candidates:
        c = c.strip()
        if not c:
            continue
        try:
            value, end = decoder.raw_decode(c)
        except ValueError:
            continue
        if isinstance(value, (dict, list)) and not c[end:].strip().strip("`").strip():
            return True
        if isinstance(value, (dict, list)) and c is not text:
            return True
    return False


def _prose_outside_code(answer: str) -> str:
    return re.sub(r"(```|~~~).*?(\1|\Z)", " ", answer, flags=re.DOTALL)


def _cut_mid_sentence(answer: str) -> bool:
    text = answer.rstrip()
    if _FENCE.search(text) and len(_FENCE.findall(text)) % 2:
        return False  # reported as an unclosed fence instead
    last = text.rsplit("\n", 1)[-1]
    if _LIST_OR_BLOCK.match(last) or _CODE_CHARS.search(last):
        return False
    # Short answers ("Paris", "B", "42") end without a full stop by nature.
    if len(last.split()) < 4 or len(text.split()) < 12:
        return False
    return bool(_DANGLING.search(last[-40:]))


# Instructions sit at the start or the end of a prompt: only those windows are read, so a
# 100 KB document costs what a short prompt costs, and a phrase deep inside it is not taken as an order.
_PROMPT_WINDOW = 1500


def _instructions(prompt: str) -> str:
    if len(prompt) <= 2 * _PROMPT_WINDOW:
        return prompt.lower()
    return (prompt[:_PROMPT_WINDOW] + "\n...\n" + prompt[-_PROMPT_WINDOW:]).lower()


def quick_gate(prompt: str, answer: str | None, *, finish_reason: str | None = None,
               expect_json: bool | None = None) -> GateVerdict:
    """Whether a cheap model's `answer` to `prompt` may go to the user, and if not, why.

    finish_reason: the provider's ("length" / "max_tokens" mean cut off by the token limit).
    expect_json: the request's own say (a JSON response_format); None: read it from the prompt.
    Reasons are short, stable strings meant for the log: "empty", "refusal", "cut off: ...",
    "format: ...", "constraint: ...".
    """
    reasons: list[str] = []
    text = (answer or "").strip()
    if not text:
        return GateVerdict(False, ["empty"])
    if finish_reason in ("length", "max_tokens"):
        reasons.append("cut off: token limit")
    if _REFUSAL.search(text[:_REFUSAL_WINDOW]):
        reasons.append("refusal")
    fences = len(_FENCE.findall(text))
    if fences % 2:
        reasons.append("cut off: unclosed code fence")
    elif "cut off: token limit" not in reasons and _cut_mid_sentence(text):
        reasons.append("cut off: ends mid-sentence")

    ask = _instructions(prompt or "")
    # Cheap substring tests first: most prompts ask for none of these, and `in` runs at C speed.
    if expect_json or (expect_json is None and "json" in ask and _ASKS_JSON.search(ask)):
        if not _is_json(text):
            reasons.append("format: JSON asked, none parseable")
    elif asks_for_code(ask) and not _CODE_SIGNS.search(text):
        reasons.append("format: code asked, none given")
    reasons.extend(_unmet_constraints(ask, text))
    return GateVerdict(not reasons, reasons)


def _unmet_constraints(ask: str, text: str) -> list[str]:
    out: list[str] = []
    if "bullet" in ask and (m := _BULLETS_ASKED.search(ask)):
        asked, got = _number(m.group(1)), len(_BULLET_LINE.findall(text))
        if got != asked:
            out.append(f"constraint: {asked} bullet points asked, {got} given")
    if "word" in ask:
        words = len(_WORD.findall(_prose_outside_code(text)))
        if m := _MAX_WORDS.search(ask):
            limit = _number(m.group(1))
            if words > limit:
                out.append(f"constraint: at most {limit} words asked, {words} given")
        elif m := _EXACT_WORDS.search(ask):
            asked = _number(m.group(1))
            # "In 50 words" is a size, not a count to the word: a tenth either way (one word: exactly).
            slack = 0 if asked == 1 else max(1, round(asked * 0.1))
            if abs(words - asked) > slack:
                out.append(f"constraint: {asked} words asked, {words} given")
        if _ONE_WORD.search(ask) and words != 1:
            out.append(f"constraint: one word asked, {words} given")
    if "sentence" in ask and (m := _MAX_SENTENCES.search(ask)):
        limit = _number(m.group(1))
        got = len(_SENTENCE_END.findall(_prose_outside_code(text)))
        if got > limit:
            out.append(f"constraint: at most {limit} sentences asked, {got} given")
    if "yes" in ask and _YES_NO.search(ask) and not re.match(r"^\W*(?:yes|no)\b", text, re.IGNORECASE):
        out.append("constraint: yes or no asked")
    if ("letter" in ask or "choice" in ask or "option" in ask) and (m := _CHOICE_ASKED.search(ask)):
        options = set(_QUOTED_OPTION.findall(m.group("opts") or "")) or set(_OPTION_LINE.findall(ask[-2000:]))
        options = {o.upper() for o in options}
        lead = _LEADING_CHOICE.match(text)
        if options and (lead is None or lead.group(1).upper() not in options):
            out.append(f"constraint: one of {'/'.join(sorted(options))} asked")
    return out


# Short answers only: two long answers worded differently may still agree, and telling needs a judge.
_SAME_ANSWER_MAX_CHARS = 80
_CHOICE_ONLY = re.compile(r"^\W*(?:answer\s*:?\s*|the answer is\s*:?\s*|option\s+)?\(?([a-z0-9])(?:[).:]|$)")
_TRAILING = re.compile(r"[\s.!。]+$")


def same_answer(a: str | None, b: str | None) -> bool | None:
    """Whether two short answers say the same thing ("B", "B) pine trees", "b." agree; "Yes." and
    "yes" agree); None when either is too long to compare without a judge, or empty."""
    a, b = (a or "").strip().lower(), (b or "").strip().lower()
    if not a or not b or len(a) > _SAME_ANSWER_MAX_CHARS or len(b) > _SAME_ANSWER_MAX_CHARS:
        return None
    ca, cb = _CHOICE_ONLY.match(a), _CHOICE_ONLY.match(b)
    if ca and cb:
        return ca.group(1) == cb.group(1)
    return " ".join(_TRAILING.sub("", a).split()) == " ".join(_TRAILING.sub("", b).split())
