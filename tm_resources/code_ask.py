"""Whether a prompt asks for code, shows code, and the words that make it about code: one definition
for the cascade's gate (asks), the loop's brevity budget (asks or shows) and the tier classifier's
code signal (its words and code lines)."""

from __future__ import annotations

import re

# Words that make a prompt about code: the tier classifier counts them (tm_gateway/tiers.py), so a
# prompt full of them is more complex whether or not it asks for code itself.
CODE_TERMS: tuple[str, ...] = (
    "function", "functions", "class", "method", "implement", "implementation", "refactor", "debug", "bug",
    "compile", "compiler", "api", "regex", "sql", "python", "javascript", "typescript", "rust", "golang",
    "go", "java", "kotlin", "swift", "ruby", "php", "bash", "script", "code", "codebase", "algorithm",
    "recursion", "recursive", "async", "await", "thread", "thread-safe", "docker", "kubernetes",
    "stacktrace", "traceback", "exception", "endpoint", "library", "module", "package", "unittest",
    "pytest", "tests", "repository", "git", "html", "css", "react", "node", "django", "flask", "numpy",
    "pandas", "struct", "pointer", "runtime", "terraform", "cli", "extension", "query",
)

# Lines that open like code (lower-cased, after indentation); an indented line counts too.
CODE_LINE_STARTS = ("def ", "class ", "function ", "import ", "from ", "#include", "public ", "private ",
                    "return ", "const ", "let ", "var ", "select ", "for (", "while (", "if (", "}", "fn ")

# Cheap substring tests first: most prompts contain none of these, and `in` runs at C speed.
_NOUNS = ("function", "method", "class", "script", "program", "snippet", "code", "query", "regex",
          "algorithm", "implement", "command", "component", "test", "website", "web page", "html", "app")
_LANGUAGES = (r"python|javascript|typescript|java|rust|go|golang|c\+\+|c#|ruby|php|bash|sql|kotlin|swift|html|css"
              r"|powershell|haskell|scala|zig|lua|perl|vba|matlab")
# Kept narrow: a cheap answer without code fails the gate when its prompt asks for code, so a false
# "code asked" costs a frontier call. Nouns that also mean other things ("a class schedule", "a query
# letter", "a code of conduct", "a conference program") count only with words that make them code.
_ASKS = re.compile(
    r"\b(?:write|implement|create|give me|generate|fix|refactor|show me|make|build|develop|rewrite|modify"
    r"|convert|translate|optimi[sz]e|complete|add)\b[^.?!\n]{0,60}?"
    r"\b(?:function|method|script|snippet|regex|algorithm|implementation|code\b(?! of)|sql query"
    r"|program (?:that|to|which|in)|class (?:that|which|to|for)|(?:shell|console|linux|bash) command"
    r"|(?:web )?component|unit tests?|(?:web ?site|web page|web app)\b)"
    rf"|\b(?:in|using)\s+(?:{_LANGUAGES})\b"
    r"[^.?!\n]{0,40}?\b(?:write|implement|function|code|script|program|create|build|make|class|game|app)\b",
    re.IGNORECASE,
)


def asks_for_code(prompt: str) -> bool:
    """Whether the prompt asks for code to be written ("write a function ...", "in Python, implement
    ..."); mentioning code, or pasting it, is not asking for it."""
    low = prompt.lower()
    return any(n in low for n in _NOUNS) and _ASKS.search(low) is not None


def shows_code(prompt: str) -> bool:
    """Whether the prompt carries code: a fence, or two lines that read as code."""
    if "```" in prompt:
        return True
    lines = 0
    for line in prompt.split("\n"):
        if line[:1] == "\t" or line[:4] == "    " or line.lstrip().lower().startswith(CODE_LINE_STARTS):
            lines += 1
            if lines == 2:
                return True
    return False


def involves_code(prompt: str) -> bool:
    """Whether a right-sized answer will hold code: the prompt asks for code or shows some."""
    return asks_for_code(prompt) or shows_code(prompt)
