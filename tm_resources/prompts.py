"""What a person wrote in a turn, apart from the blocks their client injects (Claude Code's
`<system-reminder>` and friends), so that routing, task typing and the cache judge the person's words."""

from __future__ import annotations

import re

# Tags Claude Code wraps around context it adds to a user turn (dates, file contents, hook and
# local command output): addressed to the model, not written by the person.
CLIENT_TAGS = ("system-reminder", "local-command-caveat", "local-command-stdout", "local-command-stderr",
               "user-prompt-submit-hook")
_BLOCK = re.compile(r"<(" + "|".join(CLIENT_TAGS) + r")>.*?</\1>\s*", re.DOTALL)


def split_person_text(text: str) -> tuple[str, str]:
    """(what the person wrote, what their client added). A turn with no such blocks comes back whole,
    and the client part is then empty."""
    if "<" not in text:
        return text, ""
    added = [m.group(0) for m in _BLOCK.finditer(text)]
    if not added:
        return text, ""
    return _BLOCK.sub("", text).strip(), "".join(added)


def person_text(text: str) -> str:
    return split_person_text(text)[0]
