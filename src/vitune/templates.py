"""Chat templates: a conversation becomes input ids and labels, built together, message by message.

Each message is rendered to text segments that are either supervised (the assistant's answer and
its end-of-turn marker) or not (system prompt, user turns, role headers). Every segment is
tokenized on its own and its label segment is appended beside it, so the labels can never drift
from the ids (the classic "tokenization mismatch" of string-splitting label builders). `<image>`
markers become `num_image_tokens` placeholder ids, always unsupervised.

Conversations arrive in either public form and are normalised to `Message`s first:
- LLaVA JSON: `[{"from": "human"|"gpt"|"system", "value": "..."}]`;
- OpenAI / HF messages: `[{"role": "user"|"assistant"|"system", "content": str | [parts]}]`
  where parts are `{"type": "text", "text"}` and `{"type": "image"}` / `{"type": "image_url"}`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vitune.errors import VituneError
from vitune.registry import Registry

IMAGE_MARKER = "<image>"
IGNORE_INDEX = -100

ROLES = ("system", "user", "assistant")
_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    content: str  # text with IMAGE_MARKER where each image goes


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    num_images: int = 0


def normalize_conversation(conversation: Sequence[dict[str, Any]], where: str = "conversation") -> list[Message]:
    """LLaVA `from`/`value` turns or OpenAI `role`/`content` messages -> `Message`s.

    Image content parts become IMAGE_MARKER in the text, in order, so every downstream step sees one
    form. Validates roles and alternation: optional system first, then user/assistant alternating,
    starting with user.
    """
    messages: list[Message] = []
    for i, turn in enumerate(conversation):
        if not isinstance(turn, dict):
            raise VituneError(f"{where}: turn {i} is {type(turn).__name__}, expected an object")
        if "from" in turn:
            role = _LLAVA_ROLES.get(str(turn["from"]))
            content = turn.get("value")
            field_name = "from"
        elif "role" in turn:
            role = str(turn["role"]) if turn["role"] in ROLES else None
            content = turn.get("content")
            field_name = "role"
        else:
            raise VituneError(f"{where}: turn {i} has neither 'from' nor 'role'")
        if role is None:
            raise VituneError(f"{where}: turn {i} has unknown {field_name} {turn.get(field_name)!r}")
        messages.append(Message(role, _content_text(content, f"{where}: turn {i}")))
    _check_order(messages, where)
    return messages


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                pieces.append(str(part.get("text", "")))
            elif kind in ("image", "image_url", "input_image"):
                pieces.append(IMAGE_MARKER)
            else:
                raise VituneError(f"{where}: unsupported content part {kind!r}")
        # An image part is its own line, as LLaVA writes "<image>\n" before the question.
        return "\n".join(p for p in pieces if p)
    raise VituneError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")


def _check_order(messages: list[Message], where: str) -> None:
    body = messages[1:] if messages and messages[0].role == "system" else messages
    if any(m.role == "system" for m in body):
        raise VituneError(f"{where}: a system message may only come first")
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.role != expected:
            raise VituneError(f"{where}: roles out of order at message {i}: expected {expected}, got {m.role}")


@dataclass(frozen=True)
class Template:
    """How one chat format lays out a conversation.

    Placeholders: `{bos}`/`{eos}` are the tokenizer's own special tokens, `{content}` the message,
    `{system}` the system prompt. Unsupervised: prefix, system, user turns, `assistant_header`
    (also the generation prompt), `turn_sep`. Supervised: `answer_prefix` + the answer +
    `assistant_end` (the end-of-turn marker, which is what stops generation).
    """

    name: str
    system: str = ""  # default system prompt; a system message in the conversation replaces it
    prefix: str = "{bos}"
    system_format: str = "{content}"
    user_format: str = "{content}"
    first_user_format: str = ""  # when set and a system prompt exists, it holds it (llama-2)
    round_prefix: str = ""  # before every user turn but the first
    user_images_only: bool = False  # plain: the human turn is reduced to its image markers
    assistant_header: str = ""
    answer_prefix: str = ""
    assistant_end: str = "{eos}"
    turn_sep: str = ""
    stop_strings: tuple[str, ...] = ()
    special_tokens: tuple[str, ...] = ()  # tokens the tokenizer must have (added at build time)
    description: str = ""

    def segments(self, messages: Sequence[Message], tokenizer: Any, add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """The conversation as (text, supervised) pieces, in order."""
        fill = {"bos": tokenizer.bos_token or "", "eos": tokenizer.eos_token or ""}
        system = self.system
        if messages and messages[0].role == "system":
            system = messages[0].content
            messages = messages[1:]
        out: list[tuple[str, bool]] = []
        head = self.prefix.format(**fill)
        if system and not self.first_user_format and self.system_format:
            head += self.system_format.format(content=system, **fill)
        if head:
            out.append((head, False))
        for i, m in enumerate(messages):
            if m.role == "user":
                content = m.content
                if self.user_images_only:
                    content = IMAGE_MARKER * content.count(IMAGE_MARKER)
                if i == 0 and system and self.first_user_format:
                    text = self.first_user_format.format(content=content, system=system, **fill)
                else:
                    text = ("" if i == 0 else self.round_prefix.format(**fill)) + self.user_format.format(content=content, **fill)
                if i + 1 < len(messages) or add_generation_prompt:
                    text += self.assistant_header.format(**fill)
                out.append((text, False))
            else:
                out.append((self.answer_prefix + m.content + self.assistant_end.format(**fill), True))
                if self.turn_sep:
                    out.append((self.turn_sep.format(**fill), False))
        return [(t, s) for t, s in out if t]

    def end_strings(self, tokenizer: Any) -> tuple[str, ...]:
        """Strings that end an answer: the end-of-turn marker and any extra stop strings."""
        end = self.assistant_end.format(bos=tokenizer.bos_token or "", eos=tokenizer.eos_token or "").strip()
        return tuple(dict.fromkeys(s for s in (end, *self.stop_strings) if s))


@dataclass(frozen=True)
class HFTemplate:
    """The tokenizer's own Jinja chat template, made message-by-message by prefix differences:
    each assistant message's supervised text is what it adds after the generation prompt."""

    name: str = "hf"
    description: str = "the tokenizer's own chat template (apply_chat_template)"
    special_tokens: tuple[str, ...] = ()
    stop_strings: tuple[str, ...] = field(default_factory=tuple)

    def segments(self, messages: Sequence[Message], tokenizer: Any, add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        if not getattr(tokenizer, "chat_template", None):
            raise VituneError("template 'hf' needs a tokenizer with a chat_template")
        msgs = [{"role": m.role, "content": m.content} for m in messages]
        out: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise VituneError("template 'hf': the tokenizer's chat template does not render prefixes stably")
            out.append((prompt[len(done):], False))
            out.append((full[len(prompt):], True))
            done = full
        tail = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
        if not tail.startswith(done):
            raise VituneError("template 'hf': the tokenizer's chat template does not render prefixes stably")
        if tail[len(done):]:
            out.append((tail[len(done):], False))
        return [(t, s) for t, s in out if t]

    def end_strings(self, tokenizer: Any) -> tuple[str, ...]:
        return tuple(s for s in (tokenizer.eos_token, *self.stop_strings) if s)


TEMPLATES: Registry[Template | HFTemplate] = Registry("chat template")

_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_V0_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_LLAMA2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)

for _t in (
    Template(
        name="plain",
        description="stage-1 pretraining: the image, then the caption; no instruction or roles",
        system_format="",
        user_images_only=True,
        assistant_end="\n",
    ),
    Template(
        name="llava_v0",
        description="the paper's '###Human: ... ###Assistant: ...' format",
        system=_V0_SYSTEM,
        system_format="{content}###",
        user_format="Human: {content}###",
        assistant_header="Assistant:",
        answer_prefix=" ",
        assistant_end="###",
    ),
    Template(
        name="vicuna_v1",
        description="LLaVA-1.5: system prompt, 'USER: ... ASSISTANT: ...</s>'",
        system=_VICUNA_SYSTEM,
        system_format="{content} ",
        user_format="USER: {content} ",
        assistant_header="ASSISTANT:",
        answer_prefix=" ",
        assistant_end="{eos}",
    ),
    Template(
        name="vicuna_v1_nosys",
        description="vicuna_v1 without a system prompt: 'USER: ... ASSISTANT: ...</s>' (the synthetic world's, "
                    "where the 28-token prompt was 18% of stage 2's tokens)",
        system_format="{content} ",
        user_format="USER: {content} ",
        assistant_header="ASSISTANT:",
        answer_prefix=" ",
        assistant_end="{eos}",
    ),
    Template(
        name="llama_2",
        description="Llama-2 chat: '[INST] <<SYS>> ... <</SYS>> ... [/INST] ... </s>'",
        system=_LLAMA2_SYSTEM,
        first_user_format="[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{content} [/INST]",
        user_format="[INST] {content} [/INST]",
        round_prefix="{bos}",
        answer_prefix=" ",
        assistant_end=" {eos}",
    ),
    Template(
        name="chatml",
        description="ChatML (Qwen): '<|im_start|>role\\n...<|im_end|>'",
        system="You are a helpful assistant.",
        prefix="",
        system_format="<|im_start|>system\n{content}<|im_end|>\n",
        user_format="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_header="<|im_start|>assistant\n",
        assistant_end="<|im_end|>",
        turn_sep="\n",
        special_tokens=("<|im_start|>", "<|im_end|>"),
    ),
    Template(
        name="llama_3",
        description="Llama-3 instruct: '<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>'",
        system="You are a helpful language and vision assistant.",
        system_format="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user_format="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant_end="<|eot_id|>",
        special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    HFTemplate(),
):
    TEMPLATES.add(_t.name, _t)


def get_template(name: str) -> Template | HFTemplate:
    return TEMPLATES.get(name)


def encode_conversation(
    template: Template | HFTemplate,
    messages: Sequence[Message],
    tokenizer: Any,
    image_token_id: int,
    num_image_tokens: int,
    add_generation_prompt: bool = False,
) -> Encoded:
    """Token ids and labels, one rendered segment at a time; each `<image>` becomes
    `num_image_tokens` copies of `image_token_id` with label IGNORE_INDEX."""
    ids: list[int] = []
    labels: list[int] = []
    num_images = 0
    # Adjacent unsupervised pieces (prefix, system, user turn, header) are tokenized as one string,
    # as a whole-prompt tokenizer would: no stray word-boundary tokens at their seams.
    merged: list[tuple[str, bool]] = []
    for text, supervised in template.segments(messages, tokenizer, add_generation_prompt):
        if merged and not supervised and not merged[-1][1]:
            merged[-1] = (merged[-1][0] + text, False)
        else:
            merged.append((text, supervised))
    for text, supervised in merged:
        for j, chunk in enumerate(text.split(IMAGE_MARKER)):
            if j > 0:
                if supervised:
                    raise VituneError("an <image> marker in an assistant answer is not supported")
                ids.extend([image_token_id] * num_image_tokens)
                labels.extend([IGNORE_INDEX] * num_image_tokens)
                num_images += 1
            if chunk:
                piece = tokenizer(chunk, add_special_tokens=False)["input_ids"]
                ids.extend(piece)
                labels.extend(piece if supervised else [IGNORE_INDEX] * len(piece))
    return Encoded(ids, labels, num_images)
