"""Self-critique preference data: sample two answers per prompt, have a judge pick the better one.

The study's loop: SFTe answers each training turn twice (seeded sampling; the turn asked after its
conversation's earlier turns, as in evaluation), then judges the pair with
LLaVA-Critic's pairwise prompt, asked in both orders so position bias cancels; only consistent, non-tie
verdicts become (chosen, rejected) pairs. Three judges:

- ``self``: the policy itself. It scores each verdict sentence (" The first response is better." ...) by its
  likelihood after the pairwise prompt, so every judgement is parsable at any model size;
- ``critic``: a LLaVA-Critic checkpoint, generating and parsing its verdict;
- ``reference``: ground truth (relaxed correctness, then ROUGE-L to the reference answer) — rejection
  sampling with a known answer, and the yardstick the other judges are measured against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.core.config import PairKeep
from posttrain.core.errors import InputError
from posttrain.data.declines import is_decline
from posttrain.data.examples import Example
from posttrain.evaluate.critic import PAIRWISE, combine_orders
from posttrain.evaluate.evaluation import critic_images, extract_short_answer, is_correct
from posttrain.evaluate.generation import continuation_nll, generate
from posttrain.evaluate.metrics import rouge_l
from posttrain.models.template import encode_conversation, encode_prompt

# Verdict sentences the self-judge chooses between, by likelihood.
VERDICTS = {
    "first": "The first response is better.",
    "second": "The second response is better.",
    "tie": "Both responses are equally good.",
}


@dataclass(frozen=True)
class Candidate:
    """Two sampled answers to one training prompt; `truncated` if either was cut at max_new_tokens."""

    example: Example
    a: str
    b: str
    truncated: bool = False

    @property
    def pairable(self) -> bool:
        """Whether judging can make a pair of it: the answers differ and neither was cut off."""
        return self.a.strip() != self.b.strip() and not self.truncated


def sample_candidates(
    model,
    tokenizer,
    examples: list[Example],
    pixels: list[torch.Tensor],
    n_image_tokens: int,
    *,
    temperature: float,
    top_p: float,
    seed: int,
    batch_size: int,
    max_new_tokens: int,
) -> list[Candidate]:
    """Two seeded samples per turn, each asked after its history; the prompt is computed once for both.

    `batch_size` counts prompts: the decoding runs twice as many rows.
    """
    prompts = [encode_prompt(tokenizer, e.history, e.question, n_image_tokens) for e in examples]
    pairs = generate(
        model,
        tokenizer,
        pixels,
        prompts,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        samples=2,
        progress="samples",
        with_ends=True,
    )
    return [
        Candidate(e, a, b, not (a_ended and b_ended))
        for e, ((a, a_ended), (b, b_ended)) in zip(examples, pairs)
    ]


def reference_key(example: Example, response: str) -> tuple[int, float]:
    """What the ground truth ranks a response by: (correct, ROUGE-L against the reference answer)."""
    extracted = None if is_decline(response) else extract_short_answer(response, example.answer_type)
    return int(is_correct(example, response, extracted)), round(rouge_l(response, example.answer), 6)


def reference_verdict(example: Example, first: str, second: str) -> str:
    """Ground-truth verdict: the correct answer wins; between equally correct ones, higher ROUGE-L wins."""
    return _verdict(reference_key(example, first), reference_key(example, second))


def _verdict(k1: tuple[int, float], k2: tuple[int, float]) -> str:
    return "first" if k1 > k2 else "second" if k2 > k1 else "tie"


def self_verdicts(
    model,
    tokenizer,
    pixels: list[torch.Tensor],
    candidates: list[Candidate],
    n_image_tokens: int,
    batch_size: int,
) -> list[tuple[str, str]]:
    """The policy judges its own pairs: (verdict with A first, verdict with B first) per candidate.

    Each order's verdict is the sentence of `VERDICTS` with the highest total log-likelihood after the
    pairwise prompt in the shared chat template; the prompt quotes the turn's earlier conversation. The
    prompt runs once for the three sentences (`continuation_nll`); `batch_size` counts prompts (orders).
    """
    prompts, pix = [], []
    for c, p in zip(candidates, pixels):
        for r1, r2 in ((c.a, c.b), (c.b, c.a)):
            prompt = PAIRWISE.format(question=c.example.context_question(), r1=r1, r2=r2)
            prompts.append(encode_prompt(tokenizer, (), prompt, n_image_tokens))
            pix.append(p)
    if not prompts:
        return []
    nll = continuation_nll(
        model,
        tokenizer,
        pix,
        prompts,
        verdict_continuations(tokenizer, n_image_tokens),
        batch_size=batch_size,
    )
    names = list(VERDICTS)
    orders = [names[min(range(len(names)), key=scores.__getitem__)] for scores in nll]
    return [(orders[2 * i], orders[2 * i + 1]) for i in range(len(candidates))]


def verdict_continuations(tokenizer, n_image_tokens: int) -> list[list[int]]:
    """The token ids of each `VERDICTS` sentence (and its EOS) as it follows a prompt in a training sequence.

    The template tokenizes every piece on its own, so these are the same after any prompt; checked here on a
    probe prompt: the sequence must be the prompt followed by exactly the labelled tokens.
    """
    probe = "?"
    prompt = encode_prompt(tokenizer, (), probe, n_image_tokens)
    out = []
    for sentence in VERDICTS.values():
        ids, labels = encode_conversation(tokenizer, (), probe, sentence, n_image_tokens)
        tail = ids[len(prompt) :]
        if ids[: len(prompt)] != prompt or labels[len(prompt) :] != tail:
            raise AssertionError(
                f"the template does not put {sentence!r} right after the prompt, all labelled"
            )
        out.append(tail)
    return out


def build_pairs(
    candidates: list[Candidate],
    verdicts: list[tuple[str | None, str | None]],
    keep: PairKeep = PairKeep.DECISIVE,
) -> tuple[list[dict], dict]:
    """Turn judged candidates into (prompt, chosen, rejected) rows and the judging statistics.

    Identical candidates are never a pair, nor are candidates one of which was cut at max_new_tokens: DPO
    would train its cut-off text as a completion ending in EOS. A pair is kept only when both orders agree on
    a winner, and with ``keep: correctness`` only when the chosen answer is correct and the rejected one is
    not (the pairs the reference decides by ROUGE-L alone, both answers wrong or both right, are dropped and
    counted).

    Returns:
        (pairs, stats): stats count prompts, identical candidates, order-consistent verdicts, ties, kept
        pairs, and the agreement of the kept verdicts with the `reference` judge on the same pairs.
    """
    pairs, n_identical, n_consistent, n_ties, n_agree, n_ref_decisive, n_dropped = [], 0, 0, 0, 0, 0, 0
    judged = n_truncated = 0
    for c, (v_ab, v_ba) in zip(candidates, verdicts):
        if c.a.strip() == c.b.strip():
            n_identical += 1
            continue
        if c.truncated:
            n_truncated += 1
            continue
        judged += 1
        winner = combine_orders(v_ab, v_ba)
        if winner is None:
            continue
        n_consistent += 1
        if winner == "tie":
            n_ties += 1
            continue
        chosen, rejected = (c.a, c.b) if winner == "a" else (c.b, c.a)
        k_chosen, k_rejected = reference_key(c.example, chosen), reference_key(c.example, rejected)
        if keep is PairKeep.CORRECTNESS and not k_chosen[0] > k_rejected[0]:
            n_dropped += 1
            continue
        ref = _verdict(k_chosen, k_rejected)
        n_agree += ref == "first"
        n_ref_decisive += ref != "tie"
        e = c.example
        pairs.append(
            {
                "id": e.id,
                "image": e.image,
                "prompt": e.question,
                "history": [list(t) for t in e.history],
                "chosen": chosen,
                "rejected": rejected,
                "family": e.family,
                "reference_agrees": ref == "first",
                "reference_tie": ref == "tie",
            }
        )
    n = len(candidates)
    stats = {
        "prompts": n,
        "identical_rate": round(100.0 * n_identical / n, 4) if n else None,
        "dropped_truncated": n_truncated,  # different candidates, one cut at max_new_tokens: never a pair
        "judged_pairs": judged,
        "order_consistency_rate": round(100.0 * n_consistent / judged, 4) if judged else None,
        "tie_rate": round(100.0 * n_ties / judged, 4) if judged else None,
        "pairs_kept": len(pairs),
        # of the kept pairs where ground truth prefers one answer, the share where it prefers the chosen one
        "reference_agreement": round(100.0 * n_agree / n_ref_decisive, 4) if n_ref_decisive else None,
        "reference_decisive_rate": round(100.0 * n_ref_decisive / len(pairs), 4) if pairs else None,
        "dropped_by_keep": n_dropped,  # decisive pairs that `keep` left out
    }
    return pairs, stats


class NoPairsError(InputError, RuntimeError):
    """Raised when judging leaves no usable pair: DPO would have nothing to learn from."""


def judge_candidates(
    judge,
    model,
    processor,
    candidates: list[Candidate],
    pixels: list[torch.Tensor],
    data_dir,
    critic_params,
    batch_size: int,
) -> list[tuple[str | None, str | None]]:
    """(verdict with A first, verdict with B first) for every candidate pair, by the chosen judge."""
    from posttrain.core.config import Judge

    if judge is Judge.REFERENCE:
        out = []
        for c in candidates:
            v = reference_verdict(c.example, c.a, c.b)
            out.append((v, {"first": "second", "second": "first", "tie": "tie"}[v]))
        return out
    if judge is Judge.SELF:
        from posttrain.models.loading import image_token_count

        return self_verdicts(
            model, processor.tokenizer, pixels, candidates, image_token_count(processor), batch_size
        )
    from posttrain.evaluate.critic import parse_verdict
    from posttrain.evaluate.llava_critic import LlavaCriticJudge

    critic = LlavaCriticJudge(critic_params.model, revision=critic_params.revision or None)
    _, raw = critic.judge_pairs_raw(
        critic_images(data_dir, [c.example for c in candidates]),
        [c.example.context_question() for c in candidates],
        [c.a for c in candidates],
        [c.b for c in candidates],
        batch_size=critic_params.batch_size,
        max_new_tokens=critic_params.max_new_tokens,
    )
    return [(parse_verdict(ab), parse_verdict(ba)) for ab, ba in raw]


RETOKENIZED_SLACK = 8  # tokens an answer may gain when re-tokenized inside the judge's prompt


def preference_phases(tokenizer, examples: list[Example], n_image_tokens: int, params) -> list:
    """The batches the stage runs (`posttrain.models.memory.Phase`): two samples of each prompt after its
    history, and with ``judge: self`` the pairwise prompts (question and two answers of up to max_new_tokens
    each) scored against the verdict sentences.
    """
    from posttrain.core.config import Judge
    from posttrain.models.memory import Phase

    longest = max(len(encode_prompt(tokenizer, e.history, e.question, n_image_tokens)) for e in examples)
    phases = [Phase("sampling", 2, longest, params.max_new_tokens)]
    if params.judge is Judge.SELF:
        empty = max(
            len(
                encode_prompt(
                    tokenizer,
                    (),
                    PAIRWISE.format(question=e.context_question(), r1="", r2=""),
                    n_image_tokens,
                )
            )
            for e in examples
        )
        answers = 2 * (params.max_new_tokens + RETOKENIZED_SLACK)
        verdict = max(map(len, verdict_continuations(tokenizer, n_image_tokens)))
        phases.append(Phase("self-judge", 1, empty + answers, 0, verdict))
    return phases


def preference_batch(params, base_dir, adapter, merge: bool, examples: list[Example]) -> int:
    """``preferences.batch_size`` for sampling from the base in `base_dir` with the adapter folder `adapter`
    (None: the base alone), resolved before the model loads
    (`posttrain.evaluate.generation.generation_batch`): only the base's config and processor and the
    adapter's safetensors header are read.
    """
    from posttrain.evaluate.generation import generation_batch
    from posttrain.models.loading import adapter_layer_bytes, base_config_and_processor, image_token_count

    config, processor = base_config_and_processor(base_dir)
    phases = preference_phases(processor.tokenizer, examples, image_token_count(processor), params)
    adapter_bytes = 0.0 if merge or adapter is None else adapter_layer_bytes(adapter)
    return generation_batch(
        "preferences",
        params.batch_size,
        phases,
        config=config,
        adapter_bytes=adapter_bytes,
        prompts=len(examples),
    )


def make_preferences(
    model, processor, examples: list[Example], data_dir, params, critic_params
) -> tuple[list, dict]:
    """Sample two answers per example from `model`, judge them, and keep the consistent, decisive pairs.

    Args:
        model: the policy (SFTe, or the last DPO round), in eval mode.
        processor: its processor.
        examples: the prompts (study train split).
        data_dir: the prepared folder (images).
        params: `posttrain.core.config.PreferencesParams`.
        critic_params: `posttrain.core.config.CriticParams` (for ``judge: critic``).

    Returns:
        (pairs, stats) as `build_pairs` gives them, stats with the judge's name.

    Raises:
        NoPairsError: fewer than ``params.min_pairs`` pairs survive; the message has the counts.
    """
    from posttrain.models.images import load_pixels
    from posttrain.models.loading import image_token_count

    pixel_map = load_pixels(processor, data_dir, [e.image for e in examples])
    pixels = [pixel_map[e.image] for e in examples]
    n_image_tokens = image_token_count(processor)
    candidates = sample_candidates(
        model,
        processor.tokenizer,
        examples,
        pixels,
        n_image_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        seed=params.seed,
        batch_size=params.batch_size,
        max_new_tokens=params.max_new_tokens,
    )
    # identical or cut-off candidates are never a pair (`build_pairs`): the judge's time goes to the others
    judged = [i for i, c in enumerate(candidates) if c.pairable]
    verdicts: list[tuple[str | None, str | None]] = [(None, None)] * len(candidates)
    for i, v in zip(
        judged,
        judge_candidates(
            params.judge,
            model,
            processor,
            [candidates[i] for i in judged],
            [pixels[i] for i in judged],
            data_dir,
            critic_params,
            params.batch_size,
        ),
    ):
        verdicts[i] = v
    pairs, stats = build_pairs(candidates, verdicts, params.keep)
    if len(pairs) < params.min_pairs:
        raise NoPairsError(
            f"only {len(pairs)} preference pairs survived judging "
            f"(preferences.min_pairs is {params.min_pairs}): "
            f"{stats['prompts']} prompts, {stats['identical_rate']}% identical candidates, "
            f"{stats['dropped_truncated']} with a candidate cut at preferences.max_new_tokens, "
            f"{stats['order_consistency_rate']}% order-consistent verdicts, {stats['tie_rate']}% ties, "
            f"{stats['dropped_by_keep']} decisive pairs left out by preferences.keep. "
            "Raise preferences.temperature for more diverse candidates (preferences.max_new_tokens for "
            "fewer cut ones), use more prompts "
            "(preferences.max_prompts: 0), another preferences.judge, or preferences.keep: decisive."
        )
    return pairs, stats
