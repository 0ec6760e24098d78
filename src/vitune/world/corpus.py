"""The synthetic world's text: what its tokenizer is trained on and its language model reads.

Vicuna, the LM LLaVA starts from, has read the web and answers in chat form. The world's stand-in
reads the world's captions plus the kinds of text that instruction tuning will feed it, with a
text description standing where the image will later be:
- descriptions: the scene's captions and a detailed paragraph (the `detail` kind);
- short-answer questions from `vitune.world.questions` (colour, shape, count, position,
  existence, relation; yes/no, numbers), answered in a word or in a sentence (`conversation`);
- step-by-step reasoning: counting after a change, comparing places (`complex`);
all in the chat layout of WORLD_TEMPLATE (vicuna_v1's without a system prompt), plus the system
prompts and instruction phrasings of every template, so the tokenizer has words for them.

`qa_chats` is the chat-tuning set (Vicuna's conversations, here about a scene's text): each
answer's span is marked, since that phase learns from the answers only.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Sequence

from vitune.world.captions import counted, indefinite, join, number_word, where
from vitune.world.questions import SHORT_ANSWER_SUFFIX, Question, short_answer_questions
from vitune.world.scene import Scene, relation

BRIEF_INSTRUCTIONS: tuple[str, ...] = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)
DETAIL_INSTRUCTIONS: tuple[str, ...] = (
    "Describe the following image in detail.",
    "Provide a detailed description of the given image.",
    "Give an elaborate explanation of the image you see.",
    "Share a comprehensive rundown of the presented image.",
    "Offer a thorough analysis of the image.",
    "Explain the various aspects of the image before you.",
    "Clarify the contents of the displayed image with great detail.",
    "Characterize the image using a well-detailed description.",
    "Break down the elements of the image in a detailed manner.",
    "Walk through the important details of the image.",
    "Portray the image with a rich, descriptive narrative.",
    "Narrate the contents of the image with precision.",
    "Analyze the image in a comprehensive and detailed manner.",
    "Illustrate the image through a descriptive explanation.",
    "Examine the image closely and share its details.",
    "Write an exhaustive depiction of the given image.",
    "What do you see in this image?",
    "What is happening in this picture?",
)
CHAT_USER, CHAT_ASSISTANT = "USER:", "ASSISTANT:"
# The chat template of the world's LLaVA (`vitune demo` builds with it) and of its LM's chat text:
# vicuna_v1's layout without the system prompt, a constant 28 tokens that were 18% of stage 2's
# tokens and that a model trained from scratch has no use for.
WORLD_TEMPLATE = "vicuna_v1_nosys"
_RELATION_WORDS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}


def template_texts() -> list[str]:
    """System prompts and role markers of every registered chat template, for the tokenizer."""
    from vitune.templates import TEMPLATES

    texts = []
    for name in TEMPLATES.names():
        template = TEMPLATES.get(name)
        for attr in ("system", "system_format", "user_format", "assistant_header", "assistant_end", "first_user_format"):
            value = getattr(template, attr, None)
            if isinstance(value, str) and value:
                texts.append(value)
    return texts


def detailed_description(scene: Scene, rng: random.Random) -> str:
    """A paragraph naming every object, its size and place, some relations, and the counts."""
    insts = list(scene.instances)
    n = len(insts)
    opener = rng.choice([
        f"The image shows {counted(n, 'object')} on a plain light background.",
        f"This picture contains {counted(n, 'shape')} drawn on a light background.",
        f"In this image there {'is' if n == 1 else 'are'} {counted(n, 'colored shape')}.",
    ])
    sentences = [opener]
    for inst in insts:
        sentences.append(rng.choice([
            f"{indefinite(inst.size + ' ' + inst.name).capitalize()} is {where(inst)}.",
            f"{where(inst).capitalize()} there is {indefinite(inst.size + ' ' + inst.name)}.",
        ]))
    pairs = [(a, b, r) for a in insts for b in insts if a is not b and (r := relation(a, b))]
    rng.shuffle(pairs)
    for a, b, r in pairs[:2]:
        if Counter(o.name for o in insts)[a.name] == 1 and Counter(o.name for o in insts)[b.name] == 1:
            sentences.append(f"The {a.name} is {_RELATION_WORDS[r]} the {b.name}.")
    shapes = Counter(o.category for o in insts)
    if n > 1:
        sentences.append(f"In total: {join([counted(k, s) for s, k in shapes.items()])}.")
    return " ".join(sentences)


def sentence_answer(q: Question) -> str:
    """A short-answer question answered in a full sentence."""
    subject = q.subject[:1].upper() + q.subject[1:] if q.subject else ""
    if q.type in ("color", "shape") and subject:
        return f"{subject} is {'a ' + q.answer if q.type == 'shape' else q.answer}."
    if q.type == "count" and q.subject:
        if q.answer == "1":
            return f"There is one {q.subject.removesuffix('es' if q.subject.endswith('sses') else 's')}."
        return f"There are {number_word(int(q.answer))} {q.subject}."
    if q.type == "position" and subject:
        return f"{subject} is at the {q.answer} of the image." if q.answer != "center" else f"{subject} is in the center of the image."
    if q.type == "relation" and subject:
        return f"{subject} is {_RELATION_WORDS.get(q.answer, q.answer)} {q.other}."
    if q.type == "existence":
        return f"Yes, there is {indefinite(q.subject)}." if q.answer == "yes" else f"No, there is no {q.subject}."
    return q.answer.capitalize() + "."


def reasoning(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A question that needs a step of reasoning, and a step-by-step answer."""
    insts = list(scene.instances)
    n = len(insts)
    kind = rng.choice(["remove", "add", "compare", "higher"] if n > 1 else ["remove", "add"])
    target = rng.choice(insts)
    if kind == "remove":
        q = f"If the {target.name} were taken away, how many objects would be left?"
        a = (
            f"Let's think step by step. There {'is' if n == 1 else 'are'} {counted(n, 'object')} in the image. "
            f"Removing one of them leaves {n} - 1 = {n - 1}. So the answer is {number_word(n - 1)}."
        )
    elif kind == "add":
        shape = target.category
        k = sum(1 for o in insts if o.category == shape)
        q = f"If one more {shape} were added, how many {shape}s would there be?".replace("crosss", "crosses")
        a = (
            f"First, count the {shape}s: there {'is' if k == 1 else 'are'} {number_word(k)}. "
            f"Adding one more gives {k} + 1 = {k + 1}. Therefore there would be {number_word(k + 1)}."
        ).replace("crosss", "crosses")
    elif kind == "compare":
        colors = Counter(o.color for o in insts)
        c1, c2 = rng.sample(sorted(colors), 2) if len(colors) > 1 else (target.color, target.color)
        k1, k2 = colors[c1], colors[c2]
        verdict = "yes" if k1 > k2 else "no"
        q = f"Are there more {c1} objects than {c2} objects?"
        a = (
            f"There {'is' if k1 == 1 else 'are'} {number_word(k1)} {c1} and {number_word(k2)} {c2}. "
            f"Since {k1} is {'greater than' if k1 > k2 else 'not greater than'} {k2}, the answer is {verdict}."
        )
    else:
        a_inst, b_inst = rng.sample(insts, 2)
        ya, yb = a_inst.center[1], b_inst.center[1]
        verdict = "yes" if ya < yb else "no"
        q = f"Is the {a_inst.name} higher in the picture than the {b_inst.name}?"
        a = (
            f"The {a_inst.name} is {where(a_inst)} and the {b_inst.name} is {where(b_inst)}. "
            f"Comparing their heights, the answer is {verdict}."
        )
    return q, a


def world_system() -> str:
    """WORLD_TEMPLATE's system prompt ("" when it has none)."""
    from vitune.templates import get_template

    return get_template(WORLD_TEMPLATE).system or ""


def _system_head(system: str) -> str:
    return f"{system} " if system else ""  # vicuna_v1's "{system} USER: ..."; nothing without one


def chat(system: str, context: str, turns: Sequence[tuple[str, str]]) -> str:
    """A conversation in the vicuna_v1 layout (no system prompt when `system` is empty, as in the
    world's WORLD_TEMPLATE), the scene's text where the image will go."""
    parts = [f"{_system_head(system)}{CHAT_USER} {context}\n{turns[0][0]} {CHAT_ASSISTANT} {turns[0][1]}</s>"]
    parts += [f"{CHAT_USER} {q} {CHAT_ASSISTANT} {a}</s>" for q, a in turns[1:]]
    return "".join(parts)


def scene_documents(scene: Scene, rng: random.Random, system: str) -> list[str]:
    """The texts one scene contributes: descriptions, Q&A chats, reasoning."""
    captions = list(scene.captions)
    rng.shuffle(captions)
    detail = detailed_description(scene, rng)
    context = rng.choice([" ".join(captions[:2]), detail, captions[0]])
    qs = short_answer_questions(scene, rng, per_type=1)
    rng.shuffle(qs)
    turns = [
        (f"{q.question} {SHORT_ANSWER_SUFFIX}", q.answer) if rng.random() < 0.5 else (q.question, sentence_answer(q))
        for q in qs[:4]
    ]
    docs = [" ".join(captions), detail]
    if turns:
        docs.append(chat(system, context, turns))
    docs.append(chat(system, " ".join(captions[:3]), [(rng.choice(DETAIL_INSTRUCTIONS), detail)]))
    docs.append(chat(system, captions[0], [(rng.choice(BRIEF_INSTRUCTIONS), captions[1])]))
    docs.append(chat(system, context, [reasoning(scene, rng)]))
    return docs


def qa_chats(scenes: Sequence[Scene], seed: int, questions: int = 3) -> Iterator[tuple[str, list[tuple[int, int]]]]:
    """Per scene: a chat whose context is the scene's detailed description (every object named)
    and whose turns are up to `questions` short-answer questions of shuffled types, in the layout
    `text_qa` asks them. Yields (text, character spans of the answers, each with its `</s>`)."""
    system = world_system()
    rng = random.Random(seed)
    for scene in scenes:
        qs = short_answer_questions(scene, rng)
        if not qs:
            continue
        rng.shuffle(qs)
        text, spans = f"{_system_head(system)}{CHAT_USER} {detailed_description(scene, rng)}\n", []
        for k, q in enumerate(qs[:questions]):
            text += f"{'' if k == 0 else CHAT_USER + ' '}{q.question} {SHORT_ANSWER_SUFFIX} {CHAT_ASSISTANT} "
            spans.append((len(text), len(text) + len(q.answer) + len("</s>")))
            text += f"{q.answer}</s>"
        yield text, spans


def corpus(scenes: Sequence[Scene], seed: int) -> Iterator[str]:
    """Every document of `scenes`, in a deterministic order."""
    system = world_system()
    rng = random.Random(seed)
    for scene in scenes:
        yield from scene_documents(scene, rng, system)
