"""What to ask about each image: the configured tasks expanded into prompts."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from .config import GenerationSettings, TasksConfig

DEFAULT_CAPTION_PROMPT = "Describe this image in detail."
DEFAULT_GROUNDING_PROMPT = ("Can you provide a description of the image and include the coordinates "
                            "[[x0,y0,x1,y1]] for each mentioned object?")


@dataclass
class Prompt:
    task: str  # caption | vqa | grounding
    query: str
    template: str
    settings: GenerationSettings

    def settings_json(self, **extra: Any) -> str:
        keep = {f.name for f in dataclasses.fields(GenerationSettings)}
        settings = {k: v for k, v in dataclasses.asdict(self.settings).items() if k in keep}
        return json.dumps(dict(settings, **extra), sort_keys=True)


def expand(tasks: TasksConfig, default_template: str, row_questions: str | None) -> list[Prompt]:
    """Prompts for one image, in a fixed order: caption, config questions, row questions, grounding.

    Depends only on the config and the row (never on decoding), so a failed image still yields
    one error row per prompt.
    """
    out: list[Prompt] = []
    if tasks.caption is not None:
        c = tasks.caption
        out.append(Prompt("caption", c.prompt or DEFAULT_CAPTION_PROMPT, c.template or default_template, c))
    if tasks.vqa is not None:
        v = tasks.vqa
        questions = list(v.questions)
        if v.use_column and row_questions:
            try:
                questions += [str(q) for q in json.loads(row_questions)]
            except ValueError:
                questions.append(row_questions)
        out += [Prompt("vqa", q, v.template or default_template, v) for q in questions]
    if tasks.grounding is not None:
        g = tasks.grounding
        out.append(Prompt("grounding", g.prompt or DEFAULT_GROUNDING_PROMPT, g.template or default_template, g))
    return out


def to_json(prompts: list[Prompt]) -> str:
    return json.dumps([{"task": p.task, "query": p.query, "template": p.template} for p in prompts])
