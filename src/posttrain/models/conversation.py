r"""A family's conversation format as data: the pieces that `template.encode_conversation` tokenizes.

A `Conversation` says how a user turn renders (the first one with the system preamble, if any, and the image
placeholder), what the assistant's answer starts with, what ends it (supervised: the model learns to stop
there) and what follows unsupervised before the next user turn, and whether the tokenizer adds the BOS. Each
piece is tokenized on its own, so a turn's generation prompt is exactly a prefix of the training ids.

`LLAVA` is LLaVA-1.5's format (the only one the pipeline uses today)::

    USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>...

`from_chat_template` derives one from a processor's (or tokenizer's) Jinja chat template by rendering message
lists with sentinel texts and splitting the rendered text at them; it checks that the pieces rebuild the
template's own renders of a three-turn conversation and raises `InputError` naming the template where they do
not (a template that renders a turn differently by position, say, cannot be split into fixed pieces).
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.core.errors import InputError

QUESTION = "{question}"  # where a user turn's question goes in `Conversation.first_user` / `.user`


@dataclass(frozen=True)
class Conversation:
    r"""How a conversation of (question, answer) turns about one image renders as text.

    Attributes:
        name: as messages say it (``llava-1.5``, ``chat template of qwen2.5-vl``).
        first_user: the first user turn up to where the answer starts (system preamble, image placeholder and
            generation prompt included), ``{question}`` where the question goes.
        user: a later user turn (after an answer's `end` and `separator`), likewise.
        answer_prefix: text before the (stripped) answer (LLaVA: a space after ``ASSISTANT:``).
        end: text ending an answer, supervised with it; None: the tokenizer's EOS id is appended.
        separator: text after `end`, not supervised (Qwen: the ``\n`` after ``<|im_end|>``).
        image_token: the placeholder in `first_user`, expanded to the image's token count.
        tokenizer_adds_bos: tokenize the first piece with the tokenizer's special tokens (its post-processor
            adds the BOS); False where the text itself carries whatever the template writes.
    """

    name: str
    first_user: str
    user: str
    answer_prefix: str
    end: str | None
    separator: str
    image_token: str
    tokenizer_adds_bos: bool

    def user_text(self, question: str, first: bool) -> str:
        """A user turn up to where the model answers (the first one carries the image placeholder)."""
        return (self.first_user if first else self.user).replace(QUESTION, question)

    def answer_text(self, answer: str) -> str:
        """The answer as it follows the generation prompt (`end` not included)."""
        return self.answer_prefix + answer.strip()

    def end_ids(self, tokenizer) -> list[int]:
        """Ids of the supervised end of an answer."""
        if self.end is None:
            return [tokenizer.eos_token_id]
        return tokenizer(self.end, add_special_tokens=False)["input_ids"]

    def text(self, history, question: str, answer: str | None, eos: str) -> str:
        """The text of a turn after its history (``answer`` None: the generation prompt); `eos` stands for
        the EOS id where `end` is None.
        """
        end = (eos if self.end is None else self.end) + self.separator
        out = "".join(
            self.user_text(q, first=k == 0) + self.answer_text(a) + end for k, (q, a) in enumerate(history)
        )
        out += self.user_text(question, first=not history)
        return out if answer is None else out + self.answer_text(answer) + end


LLAVA = Conversation(
    name="llava-1.5",
    first_user=f"USER: <image>\n{QUESTION} ASSISTANT:",
    user=f"USER: {QUESTION} ASSISTANT:",
    answer_prefix=" ",
    end=None,
    separator="",
    image_token="<image>",
    tokenizer_adds_bos=True,
)

# sentinels rendered in place of questions and answers: plain text no template rewrites (no spaces to trim)
_Q = tuple(f"QQQ{k}QQQ" for k in range(1, 4))
_A = tuple(f"AAA{k}AAA" for k in range(1, 4))


def _messages(turns: int, answered: int) -> list[dict]:
    """`turns` user messages (the image in the first), the first `answered` of them answered."""
    out = []
    for k in range(turns):
        content = [{"type": "text", "text": _Q[k]}]
        out.append({"role": "user", "content": ([{"type": "image"}] if k == 0 else []) + content})
        if k < answered:
            out.append({"role": "assistant", "content": [{"type": "text", "text": _A[k]}]})
    return out


def from_chat_template(
    renderer, name: str, image_token: str, chat_template: str | None = None
) -> Conversation:
    """The conversation format of a chat template, split into the pieces `encode_conversation` tokenizes.

    Args:
        renderer: a processor or tokenizer with ``apply_chat_template`` (its ``eos_token`` decides where the
            supervised end of an answer stops: the model stops generating there).
        name: the family or checkpoint the template belongs to, for messages.
        image_token: the placeholder the template writes for an image (``<|image_pad|>``), expanded to the
            image's token count.
        chat_template: the Jinja template; None: the renderer's own.

    Raises:
        InputError: naming `name`, where the template cannot be split into a first user turn, a later user
            turn and an answer's end that rebuild its renders of a three-turn conversation.
    """
    tokenizer = getattr(renderer, "tokenizer", renderer)
    eos = tokenizer.eos_token

    def render(turns: int, answered: int) -> str:
        return renderer.apply_chat_template(
            _messages(turns, answered),
            chat_template=chat_template,
            tokenize=False,
            add_generation_prompt=answered < turns,
        )

    def fail(why: str) -> InputError:
        return InputError(
            f"the chat template of {name} cannot be used as a conversation format: {why}. posttrain builds "
            "each turn from fixed pieces (first user turn, later user turn, answer end) so that generation "
            "prompts are prefixes of the training ids; give a template that renders every turn the same way"
        )

    def split(text: str, sentinel: str) -> tuple[str, str]:
        if text.count(sentinel) != 1:
            raise fail(f"{sentinel!r} renders {text.count(sentinel)} times in {text!r}")
        before, after = text.split(sentinel)
        return before, after

    first = render(1, 0)
    before, first_after = split(first, _Q[0])
    first_user = before + QUESTION + first_after
    if first_user.count(image_token) != 1:
        raise fail(
            f"the first user turn {first!r} holds the image placeholder {image_token!r} "
            f"{first_user.count(image_token)} times, not once"
        )
    second = render(2, 1)
    if not second.startswith(first):
        raise fail(f"the second turn's prompt {second!r} does not start with the first's {first!r}")
    answer_prefix, rest = split(second[len(first) :], _A[0])
    full = render(3, 3)
    _, tail = split(full, _A[2])  # what ends the last answer: the supervised end and the separator
    if not rest.startswith(tail):
        raise fail(
            f"the text after an answer {rest!r} does not start with the text ending the last one {tail!r}"
        )
    user_before, user_after = split(rest[len(tail) :], _Q[1])
    if eos and tail.startswith(eos):
        end, separator = eos, tail[len(eos) :]
    elif eos and eos in tail:
        raise fail(f"the answer's end {tail!r} holds the EOS {eos!r} after other text")
    else:
        end, separator = tail, ""
    conversation = Conversation(
        name=f"chat template of {name}",
        first_user=first_user,
        user=user_before + QUESTION + user_after,
        answer_prefix=answer_prefix,
        end=end,
        separator=separator,
        image_token=image_token,
        tokenizer_adds_bos=False,
    )
    turns = list(zip(_Q, _A))
    for k in range(3):
        for answered, got in ((k, conversation.text(turns[:k], _Q[k], None, eos)), (k + 1, None)):
            want = render(k + 1, answered)
            got = got if got is not None else conversation.text(turns[:k], *turns[k], eos)
            if got != want:
                raise fail(f"its pieces rebuild turn {k + 1} as {got!r}, but it renders {want!r}")
    return conversation
