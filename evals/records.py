"""The one record type every dataset loader maps to.

A record is one requested edit plus the prompts used to evaluate it. Which teacher-forced protocol scores it
(docs/methods.md, "Evaluation protocols") is stored with it, so the evaluator never guesses from file names:

* ``protocol == "probability"`` (CounterFact, the built-in set): a prompt counts as edited when the mean per-token
  NLL of `` target_new`` is below that of `` target_true``; neighbourhood prompts count when the reverse holds.
* ``protocol == "token_accuracy"`` (zsRE, KnowEdit): share of answer tokens that are the argmax of the next-token
  distribution given the prompt and the previous answer tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Protocol = Literal["probability", "token_accuracy"]


@dataclass(frozen=True)
class PromptCase:
    """A prompt with its accepted answers (the first is the canonical one; the rest are aliases)."""

    prompt: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class EditRecord:
    """One requested edit: in ``prompt`` (which contains ``subject`` literally) the answer becomes ``target_new``.

    Answers are stored without a leading space; scoring code adds the separating space itself.
    """

    case_id: str
    source: str  # e.g. "counterfact", "counterfact-memit", "zsre", "knowedit-zsre", "knowedit-wiki_counterfact", "builtin"
    protocol: Protocol
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    # CounterFact neighbourhood prompts / zsRE ``loc`` questions: scored for specificity.
    neighborhood: tuple[PromptCase, ...] = ()
    # KnowEdit locality prompts (scored as agreement with the unedited model's predictions), by sub-key.
    locality: dict[str, tuple[PromptCase, ...]] = field(default_factory=dict)
    # KnowEdit portability prompts (scored as token accuracy against their answers), by sub-key.
    portability: dict[str, tuple[PromptCase, ...]] = field(default_factory=dict)
    generation_prompts: tuple[str, ...] = ()

    def prompt_template(self) -> str:
        """The rewrite prompt with the subject's first occurrence replaced by ``{}`` (the MEMIT request form)."""
        start = self.prompt.find(self.subject)
        if start < 0:
            raise ValueError(f"record {self.case_id}: subject {self.subject!r} does not occur in prompt {self.prompt!r}")
        return self.prompt[:start] + "{}" + self.prompt[start + len(self.subject):]
