"""One definition of "does this prompt ask for code?", read by the gate, the brevity budget and the tiers."""

from __future__ import annotations

import pytest

from tm_gateway.gate import quick_gate
from tm_resources.code_ask import asks_for_code, involves_code, shows_code
from tm_resources.quality import expected_output_tokens

PASTED = "Why does this print 3?\n\n```python\nx = [1, 2]\nprint(len(x) + 1)\n```"


@pytest.mark.parametrize("prompt,asks,shows", [
    ("Write a Python function that reverses a list.", True, False),
    ("In Rust, how would I build a small CLI app that counts words?", True, False),
    ("write a linux console command to number every file in a folder", True, False),
    (PASTED, False, True),
    ("def f(x):\n    return x + 1\nWhat does f(2) return?", False, True),
    ("Create a program for a two-day conference on climate.", False, False),
    ("What is the code of conduct at our office?", False, False),
])
def test_asking_for_code_and_showing_it_are_told_apart(prompt, asks, shows):
    assert (asks_for_code(prompt), shows_code(prompt), involves_code(prompt)) == (asks, shows, asks or shows)


def test_the_gate_and_the_brevity_budget_read_the_same_definition():
    # Asked: the gate wants code in the answer, and the budget has room for it.
    assert quick_gate("Write a Python function that reverses a list.", "Just reverse it.").reasons == [
        "format: code asked, none given"]
    # Shown, not asked: an answer in prose passes, but the budget still has room for code.
    assert quick_gate(PASTED, "Because len(x) is 2 and one is added to it.").passed
    assert expected_output_tokens(PASTED) - expected_output_tokens(PASTED.split("\n\n")[0]) > 100
