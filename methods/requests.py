"""The edit request the editing stages consume (``methods`` never imports the dataset records of ``evals``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EditRequest:
    """Make ``prompt`` (with ``{}`` where the subject goes) continue with ``target``.

    ``target`` carries no leading space; the stages add the separating space (MEMIT's convention).
    """

    prompt: str
    subject: str
    target: str

    def __post_init__(self):
        if self.prompt.count("{}") != 1:
            raise ValueError(f"edit prompt must contain exactly one '{{}}' for the subject: {self.prompt!r}")
        if not self.subject:
            raise ValueError(f"edit request for {self.prompt!r} has an empty subject")

    @property
    def filled_prompt(self) -> str:
        return self.prompt.replace("{}", self.subject, 1)

    @property
    def target_with_space(self) -> str:
        return self.target if self.target.startswith(" ") else " " + self.target
