"""The cascade's quick quality gate: plainly unusable answers fail with a reason the log can show,
good answers pass (a false failure costs a frontier call), and it is fast."""

from __future__ import annotations

import time

import pytest

from tm_gateway.gate import quick_gate, same_answer

GOOD_PROSE = ("Photosynthesis is how plants turn light, water and carbon dioxide into sugar and oxygen. "
              "It happens in the chloroplasts.")


@pytest.mark.parametrize("answer", ["", "   \n\t ", None])
def test_empty_answer_fails(answer):
    assert quick_gate("What is photosynthesis?", answer) == (False, ["empty"])


@pytest.mark.parametrize("answer", [
    "I'm sorry, but I can't help with that request.",
    "I can't help with creating malware.",
    "As an AI language model, I do not have personal opinions.",
    "I cannot assist with that.",
    "Unfortunately, I am unable to provide that information.",
    "I do not feel comfortable writing that story.",
    "I apologize, but I won't be able to do this.",
])
def test_refusals_fail(answer):
    passed, reasons = quick_gate("Write a story about a heist.", answer)
    assert not passed and "refusal" in reasons


@pytest.mark.parametrize("answer", [
    "I can't believe how simple this is: reverse it with `items[::-1]`.",
    "```python\nprint(\"I can't help it\")\n```",
    "Sure. Note that an AI cannot replace a lawyer, but here are the steps: file form 12 at the court.",
])
def test_answers_that_only_mention_refusal_words_pass(answer):
    assert quick_gate("Help me with this.", answer).passed


def test_token_limit_is_a_cut_off():
    passed, reasons = quick_gate("Explain TCP.", GOOD_PROSE, finish_reason="length")
    assert not passed and reasons == ["cut off: token limit"]
    assert quick_gate("Explain TCP.", GOOD_PROSE, finish_reason="max_tokens").passed is False
    assert quick_gate("Explain TCP.", GOOD_PROSE, finish_reason="stop").passed


def test_unclosed_code_fence_is_a_cut_off():
    answer = "Here is the function:\n\n```python\ndef reverse(items):\n    return items[::-"
    passed, reasons = quick_gate("Write a Python function that reverses a list.", answer)
    assert not passed and "cut off: unclosed code fence" in reasons


def test_prose_ending_mid_sentence_is_a_cut_off():
    answer = ("There are three main reasons why the Roman Empire declined. The first was economic: "
              "heavy taxation and inflation weakened the")
    passed, reasons = quick_gate("Why did Rome fall?", answer)
    assert not passed and reasons == ["cut off: ends mid-sentence"]


@pytest.mark.parametrize("answer", [
    "Paris",
    "B",
    "42",
    "- first point\n- second point",
    "Time complexity: O(n log n) because of the sort, and the space is linear in the input list",
    "Example:\nreverse([1, 2, 3])  # [3, 2, 1]",
])
def test_complete_answers_without_a_full_stop_pass(answer):
    assert quick_gate("Answer the question.", answer).passed


@pytest.mark.parametrize("answer", [
    '{"name": "Ada", "born": 1815}',
    '```json\n{"name": "Ada", "born": 1815}\n```',
    'Here is the JSON:\n{"name": "Ada", "born": 1815}',
    '[{"name": "Ada"}]',
])
def test_json_asked_and_given_passes(answer):
    assert quick_gate("Return the person as JSON with keys name and born.", answer).passed


def test_json_asked_but_not_parseable_fails():
    passed, reasons = quick_gate("Respond with valid JSON: the person's name and birth year.",
                                 "name: Ada Lovelace, born: 1815.")
    assert not passed and reasons == ["format: JSON asked, none parseable"]
    broken = '{"name": "Ada", "born": 1815'
    assert quick_gate("Output JSON only.", broken).passed is False


def test_json_required_by_the_request_not_the_prompt():
    assert quick_gate("Who was Ada Lovelace?", "A mathematician.", expect_json=True).passed is False
    assert quick_gate("Who was Ada Lovelace?", '{"who": "a mathematician"}', expect_json=True).passed
    # A prompt that merely mentions JSON does not demand it.
    assert quick_gate("What does JSON stand for?", "JavaScript Object Notation.").passed


def test_code_asked_but_none_given_fails():
    prompt = "Write a Python function that checks whether a number is prime."
    passed, reasons = quick_gate(prompt, "You can check divisibility by every number up to its square root.")
    assert not passed and reasons == ["format: code asked, none given"]
    code = "```python\ndef is_prime(n):\n    return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))\n```"
    assert quick_gate(prompt, code).passed
    unfenced = "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, n))"
    assert quick_gate(prompt, unfenced).passed


@pytest.mark.parametrize("prompt", [
    "Create a class schedule for my school week.",
    "Write a query letter to a literary agent for my novel.",
    "Write a code of conduct for our open-source project.",
    "Create a program for a two-day conference on climate.",
])
def test_words_that_only_sound_like_code_do_not_demand_code(prompt):
    assert quick_gate(prompt, "Monday: keynote and workshops. Tuesday: panels and the closing talk.").passed


@pytest.mark.parametrize("prompt,answer,ok", [
    ("Summarize the article in 3 bullet points.", "- one\n- two\n- three", True),
    ("Summarize the article in 3 bullet points.", "- one\n- two\n- three\n- four", False),
    ("Give me the key risks in three bullets.", "1. cost\n2. time\n3. scope", True),
    ("Describe Paris in under 10 words.", "The capital of France, on the Seine.", True),
    ("Describe Paris in under 10 words.", "Paris is the capital of France and it sits on the river Seine.", False),
    ("What is the capital of France? Answer in one word.", "Paris.", True),
    ("What is the capital of France? Answer in one word.", "The capital is Paris.", False),
    ("Is water wet? Answer yes or no.", "Yes.", True),
    ("Is water wet? Answer yes or no.", "It depends on the definition.", False),
    ("Explain gravity in at most 2 sentences.", "Mass attracts mass. That is all.", True),
    ("Explain gravity in at most 2 sentences.", "Mass attracts mass. It bends spacetime. Apples fall.", False),
    ("Which is bigger?\nA) a mouse\nB) a whale\nPrint only a single choice from \"A\" or \"B\" without explanation.",
     "B", True),
    ("Which is bigger?\nA) a mouse\nB) a whale\nPrint only a single choice from \"A\" or \"B\" without explanation.",
     "Rachel", False),
    ("Which is bigger?\nA) a mouse\nB) a whale\nPrint only a single choice from \"A\" or \"B\" without explanation.",
     "I do", False),
])
def test_explicit_constraints(prompt, answer, ok):
    passed, reasons = quick_gate(prompt, answer)
    assert passed is ok, reasons
    if not ok:
        assert all(r.startswith("constraint:") for r in reasons)


def test_reasons_accumulate():
    passed, reasons = quick_gate("Return JSON in under 5 words.", "I'm sorry, but I cannot share that data with you today.")
    assert not passed
    assert "refusal" in reasons and "format: JSON asked, none parseable" in reasons
    assert any(r.startswith("constraint: at most 5 words") for r in reasons)


def test_an_instruction_deep_inside_a_long_document_is_not_an_order():
    document = "Background. " * 400 + "The memo asked staff to answer yes or no by Friday. " + "More text. " * 400
    prompt = "Summarize this memo for the board:\n\n" + document
    assert quick_gate(prompt, "The memo sets a Friday deadline for staff replies.").passed


def test_gate_is_fast():
    prompt = "Summarize the report below in 3 bullet points and return JSON.\n\n" + "Revenue grew. " * 500
    answer = '```json\n{"points": ["a", "b", "c"]}\n```\n- a\n- b\n- c'
    quick_gate(prompt, answer)
    times = []
    for _ in range(300):
        t = time.perf_counter()
        quick_gate(prompt, answer)
        times.append(time.perf_counter() - t)
    times.sort()
    assert times[len(times) // 2] < 0.001


@pytest.mark.parametrize("a,b,same", [
    ("B", "b) pine trees", True),
    ("(C)", "c.", True),
    ("Answer: D", "D", True),
    ("A", "B", False),
    ("Yes.", "yes", True),
    ("a cat", "a dog", False),
    ("Paris", "paris!", True),
    ("", "A", None),
    ("x" * 200, "x" * 200, None),
])
def test_same_answer(a, b, same):
    assert same_answer(a, b) is same
