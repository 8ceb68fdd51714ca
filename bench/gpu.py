"""GPU figures of the real architecture: llava-1.5-7b with random weights (configs/llava-1.5-7b), one GPU.

    python bench/gpu.py --out bench/results/h100.json

Measures on the card itself: copy bandwidth and bf16 matmul peak; LoRA SFT throughput (bf16, QLoRA nf4,
LoRA r=16 on every linear layer of the language model, the layers `posttrain.train.sft` adapts) with
model FLOP utilisation (model FLOPs = 4·N·T per sample for a frozen base: forward 2NT + input-gradient
backward 2NT; recomputation not counted) and peak memory; batched greedy generation tokens/s against the
memory-bandwidth limit of that batch (weights plus KV cache read per decode step, at the measured copy
bandwidth). Then projects the study's wall time from those rates. Prints every figure and writes them as JSON.
"""

import argparse
import gc
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from posttrain.models.architectures import build_random, load_config, param_count
from posttrain.models.family import LLAVA_15
from posttrain.realscale.e2e import PRESET
from posttrain.train.trainer import answer_loss

IMAGE_TOKENS = 576  # (336 / 14)²
TEXT_TOKENS = 129  # question + answer: seq 705 as in DESIGN.md's measurements
LM_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def timed(fn, repeat: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def _copy_seconds(n: int) -> float:
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    return timed(lambda: dst.copy_(src), 10)


def _matmul_seconds(n: int) -> float:
    x = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    y = torch.randn_like(x)
    for _ in range(3):
        x @ y
    return timed(lambda: x @ y, 10)


def card_peaks() -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and bf16 8192³ matmul throughput."""
    n = 1 << 30  # 2 GiB of bf16
    copy_s, mm_s = _copy_seconds(n), _matmul_seconds(8192)
    torch.cuda.empty_cache()
    return {
        "copy_bandwidth_gb_s": round(2 * 2 * n / copy_s / 1e9, 1),
        "bf16_matmul_tflops": round(2 * 8192**3 / mm_s / 1e12, 1),
    }


def batch(config, size: int, device="cuda") -> dict:
    """Random pixels and tokens in LLaVA's layout: BOS, 576 image tokens, text; loss on the last 100."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (size, 1 + IMAGE_TOKENS + TEXT_TOKENS - 1), generator=g)
    ids[:, 0] = 1
    ids[:, 1 : 1 + IMAGE_TOKENS] = config.image_token_id
    labels = ids.clone()
    labels[:, : ids.shape[1] - 100] = -100
    pixels = torch.randn(size, 3, 336, 336, generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
        "pixel_values": pixels.to(device, torch.bfloat16),
    }


def sft_throughput(
    model,
    config,
    batch_size: int,
    steps: int,
    n_params: int,
    peak_tflops: float,
    checkpointing: bool,
    full_loss: bool = False,
) -> tuple[dict, torch.nn.Module]:
    """LoRA r=16 on the language model; AdamW on the adapter; samples/s over `steps` after warm-up.

    Returns the figures and the model with the adapter removed again, ready for the next variant.
    """
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules=LLAVA_15.lora_regex(LM_LINEAR))
    model = get_peft_model(model, lora)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    inputs = batch(config, batch_size)

    features = {k: v for k, v in inputs.items() if k != "labels"}

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if full_loss:  # transformers' loss: logits at every position
                loss = model(**inputs).loss
            else:  # the stages' loss: logits at the answer positions only
                loss, _ = answer_loss(model, features, inputs["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def vision():  # what caching the frozen tower's and projector's outputs would save per step
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model.get_image_features(pixel_values=inputs["pixel_values"])

    for _ in range(3):
        step()
    torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, steps)
    vision()
    vision_seconds = timed(vision, steps)
    samples_per_s = batch_size / seconds
    tokens = inputs["input_ids"].shape[1]
    mfu = 4 * n_params * tokens * samples_per_s / (peak_tflops * 1e12)
    opt.state.clear()  # free the optimizer state before the next variant
    figures = {
        "batch": batch_size,
        "seq_len": tokens,
        "samples_per_s": round(samples_per_s, 2),
        "mfu": round(mfu, 4),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1),
        "gradient_checkpointing": checkpointing,
        "vision_forward_share": round(vision_seconds / seconds, 4),
        "loss": "full" if full_loss else "answer positions",
    }
    if checkpointing:
        model.gradient_checkpointing_disable()
    return figures, model.unload()


def dpo_throughput(model, config, pairs: int, steps: int) -> tuple[dict, torch.nn.Module]:
    """DPO's compute per step, as TRL runs it for a LoRA policy: the policy forward and backward on the
    chosen and rejected sequences (2·pairs), and a no-grad reference forward with the adapter switched off;
    sigmoid loss with beta 0.1, AdamW on the adapter. Returns pairs/s and the model without the adapter."""
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules=LLAVA_15.lora_regex(LM_LINEAR))
    model = get_peft_model(model, lora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    inputs = batch(config, 2 * pairs)  # rows [:pairs] chosen, [pairs:] rejected; loss positions = completion
    labels = inputs.pop("labels")

    def logps(logits):  # (2P, T, V) -> (2P,) summed log-probs of the completion tokens
        targets = labels[:, 1:]
        mask = targets != -100
        lp = torch.gather(F.log_softmax(logits[:, :-1].float(), -1), 2, targets.clamp(min=0)[..., None])[
            ..., 0
        ]
        return (lp * mask).sum(1)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with torch.no_grad(), model.disable_adapter():
                ref = logps(model(**inputs).logits)
            pol = logps(model(**inputs).logits)
        margin = (pol[:pairs] - ref[:pairs]) - (pol[pairs:] - ref[pairs:])
        loss = -F.logsigmoid(0.1 * margin).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, steps)
    figures = {
        "pairs_per_step": pairs,
        "pairs_per_s": round(pairs / seconds, 2),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1),
    }
    opt.state.clear()
    return figures, model.unload()


def stage_generation(
    model, config, tokenizer, prompts: int, batch: int, samples: int, cache: str, copy_gb_s: float
) -> dict:
    """Generation through the stages' own code (`posttrain.evaluate.generation.generate`) on prompts shaped
    like the study's: BOS, 576 image tokens, 40–80 text tokens; 128 new tokens a row at most.

    Tokens/s counts the tokens each row generated (to its EOS, if random weights emit one), the prompt's
    computation included. The bandwidth limit is the decode steps' bound (weights plus the KV cache of every
    row read once per step at the card's copy bandwidth, at the mean context); the prefill is timed on its own
    (one new token) and reported.
    """
    from posttrain.evaluate import generation

    g = torch.Generator().manual_seed(1)
    ids = []
    for _ in range(prompts):
        text = torch.randint(3, 32000, (int(torch.randint(40, 81, (1,), generator=g)),), generator=g).tolist()
        ids.append([1] + [config.image_token_id] * IMAGE_TOKENS + text)
    pixels = [torch.randn(3, 336, 336, generator=g).to(torch.bfloat16) for _ in range(prompts)]
    kwargs = dict(batch_size=batch, samples=samples, cache=cache, do_sample=samples > 1, seed=0)
    model.eval()
    generation.generate(model, tokenizer, pixels[:batch], ids[:batch], max_new_tokens=4, **kwargs)  # warm-up
    generation._TOTALS.clear()
    generation.generate(model, tokenizer, pixels, ids, max_new_tokens=128, **kwargs)
    rates = generation.throughput()["generate"]
    generation._TOTALS.clear()
    generation.generate(model, tokenizer, pixels, ids, max_new_tokens=1, **kwargs)
    prefill = generation.throughput()["generate"]["seconds"]
    generation._TOTALS.clear()
    text = config.text_config
    weights = 2 * sum(p.numel() for p in model.parameters())
    kv_per_token = (
        2
        * text.num_hidden_layers
        * text.num_key_value_heads
        * (text.hidden_size // text.num_attention_heads)
        * 2
    )
    rows = batch * samples
    mean_context = rates["prompt_tokens"] / rates["prompts"] + 64
    step_seconds = (weights + kv_per_token * mean_context * rows) / (copy_gb_s * 1e9)
    limit = rows / step_seconds
    return {
        "prompts": prompts,
        "batch": batch,
        "samples": samples,
        "cache": cache,
        "new_tokens": rates["new_tokens"],
        "seconds": rates["seconds"],
        "tokens_per_s": rates["new_tokens_per_s"],
        "prefill_seconds": round(prefill, 3),
        "bandwidth_limit_tokens_per_s": round(limit, 1),
        "bandwidth_fraction_end_to_end": round(rates["new_tokens_per_s"] / limit, 4),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1),
    }


def critic_scoring(folder: str, items: int, batch_size: int, new_tokens: int) -> dict:
    """LLaVA-Critic pointwise scores through `posttrain.evaluate.llava_critic.LlavaCriticJudge` (the
    evaluation's code) on a stand-in critic: items/s with `new_tokens` generated per item (random weights
    rarely stop early)."""
    from PIL import Image

    from posttrain.evaluate.llava_critic import LlavaCriticJudge

    judge = LlavaCriticJudge(folder)
    images = [Image.new("RGB", (336, 336), (i * 37 % 255, 90, 160)) for i in range(items)]
    questions = ["What is the value of the red bar?"] * items
    responses = ["The red bar has a value of 7, the highest of the five bars in the chart."] * items
    judge.score(images[:batch_size], questions[:batch_size], responses[:batch_size], batch_size, new_tokens)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    judge.score(images, questions, responses, batch_size=batch_size, max_new_tokens=new_tokens)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    figures = {
        "items": items,
        "batch": batch_size,
        "max_new_tokens": new_tokens,
        "items_per_s": round(items / seconds, 2),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1),
    }
    del judge
    return figures


STUDY_TEST_ITEMS = 373  # 200 test images × 1.866 turns a conversation (bench/results/tokens.json)
SEQUENCE_TOKENS = 640  # a conversation of LRV Chart: 576 image tokens and ~60 of text (tokens.json: 617 mean)
JUDGE_SEQUENCE_TOKENS = 960  # a self-judging sequence: image, question, two answers of up to 128, verdict
MODEL_STAGES = 14  # stages that load the 7B model: 4 SFT, ensemble, preferences, DPO, 7 evaluations


def load_llava(folder: str | Path, nf4: bool):
    """LLaVA from `folder` on the GPU in bf16, or as nf4 the way the stages quantize QLoRA's base."""
    from transformers import LlavaForConditionalGeneration

    from posttrain.core.config import Quantization
    from posttrain.models.loading import quantization_config

    return LlavaForConditionalGeneration.from_pretrained(
        folder,
        dtype=torch.bfloat16,
        quantization_config=quantization_config(Quantization.NF4, LLAVA_15) if nf4 else None,
        device_map={"": "cuda"},
        use_safetensors=True,
    )


def project(preset, rates: dict) -> dict:
    """Minutes of the study preset (`configs/study.yaml`) at the given rates, part by part.

    SFT trains variants × max_steps × effective batch conversations; preferences sample max_prompts × 2
    answers of max_new_tokens and self-judge each pair in both orders (at the stage's measured pairwise
    prompts/s where the rates have it; else 3 verdict sentences scored as whole teacher-forced sequences, as
    the judge did before it computed the prompt once); DPO takes every prompt as a pair (an upper bound)
    for its epochs; evaluation answers the test items with every model (base, 4 SFT, SFTe, SFTe_DPO), scores
    their test loss and has the critic score them. Answer lengths are the presets' maxima: random weights
    rarely stop early, real answers do. Every model-loading stage pays its start-up (loading, quantizing)
    once.
    """
    sft, prefs, dpo, ev = preset.sft.common, preset.preferences, preset.dpo, preset.evaluate
    effective = rates["sft_effective_batch"]
    models = len(preset.sft.variants) + 3
    seconds = {
        "sft": len(preset.sft.variants) * sft.max_steps * effective / rates["sft_samples_per_s"],
        "preferences": prefs.max_prompts * 2 * prefs.max_new_tokens / rates["sample_tokens_per_s"]
        + (
            prefs.max_prompts * 2 / rates["judge_prompts_per_s"]
            if rates.get("judge_prompts_per_s")
            else prefs.max_prompts * 2 * 3 * JUDGE_SEQUENCE_TOKENS / rates["score_tokens_per_s"]
        ),
        "dpo": prefs.max_prompts * dpo.epochs / rates["dpo_pairs_per_s"],
        "evaluation": models
        * STUDY_TEST_ITEMS
        * (
            ev.max_new_tokens / rates["generate_tokens_per_s"]
            + SEQUENCE_TOKENS / rates["score_tokens_per_s"]
            + 1 / rates["critic_items_per_s"]
        ),
        "stage_startup": MODEL_STAGES * rates["stage_startup_s"],
    }
    minutes = {k: round(v / 60, 1) for k, v in seconds.items()}
    minutes["total"] = round(sum(seconds.values()) / 60, 1)
    return minutes


def study_preset():
    """configs/study.yaml's settings (sizes only: its hub revision is left for `pin` to fill in)."""
    import yaml

    from posttrain.core.config import parse_params

    data = yaml.safe_load(PRESET.read_text())
    data["base"]["revision"] = "0" * 40  # pinned by `python -m posttrain pin`; the projection reads no hub
    data["prepare"]["lrv"]["revision"] = "0" * 40
    return parse_params(data, str(PRESET))


def computed(generation: dict) -> float:
    """Row positions decoded per second (EOS or not); the tokens up to EOS where a log has no such count."""
    return generation.get("computed_tokens_per_s") or generation["new_tokens_per_s"]


def stage_rates(summary: dict, preset) -> dict:
    """The rates `python -m posttrain e2e WORKDIR --measure` read from the stages' logs (its summary.json),
    and the stages' start-up: an SFT stage's wall time less its training time."""
    rates = summary["stage_rates"]
    sft_stages = [k for k in summary["stage_seconds"] if k.startswith("sft@")]
    # what the --measure run trained, not the preset's (runs before the summary said so trained 24)
    steps = summary.get("measure", {}).get("sft_steps", 24)
    startup = [
        summary["stage_seconds"][k]
        - steps * rates["sft_effective_batch"] / rates["sft_samples_per_s_each"][k.split("@")[1]]
        for k in sft_stages
    ]
    return {
        "sft_samples_per_s": rates["sft_samples_per_s"],
        "sft_effective_batch": rates["sft_effective_batch"],
        # every row of a batch decoding until the batch's last row ends (what the projection's answers of
        # max_new_tokens each cost); older summaries counted only the tokens up to each row's EOS
        "generate_tokens_per_s": computed(rates["evaluate_generate"]),
        "sample_tokens_per_s": computed(rates["preferences_generate"]),
        "score_tokens_per_s": rates["evaluate_score"]["tokens_per_s"],
        # pairwise prompts (one order of a pair) the self-judge scored per second, its 3 verdicts included
        "judge_prompts_per_s": (rates.get("preferences_judge") or {}).get("prompts_per_s"),
        "stage_startup_s": round(max(startup), 1),
    }


def add_projection(result: dict, summary: dict, judge: dict | None = None) -> None:
    """Project the study preset into `result` from the e2e --measure `summary` and this bench's DPO and critic
    rates (keys ``stage_*``, ``projected_study_minutes``); the self-judge's rate from `bench/judge.py`'s
    `judge` results where the summary has none (--measure samples with the reference judge: random weights
    cannot judge)."""
    preset = study_preset()
    rates = stage_rates(summary, preset)
    rates.update(dpo_pairs_per_s=result["dpo_pairs_per_s"], critic_items_per_s=result["critic_items_per_s"])
    if not rates["judge_prompts_per_s"] and judge:
        rates["judge_prompts_per_s"] = judge["judge_prompts_per_s"]
        result["judge_rate_from"] = {
            k: judge[k] for k in ("device", "batch", "mean_prompt_tokens", "speedup")
        }
    result["stage_rates"] = rates
    result["stage_rates_from"] = {"device": summary.get("device"), "stage_seconds": summary["stage_seconds"]}
    result["stage_sft_samples_per_s"] = rates["sft_samples_per_s"]
    result["stage_generate_tokens_per_s"] = rates["generate_tokens_per_s"]
    result["projected_study_minutes_breakdown"] = project(preset, rates)
    result["projected_study_minutes"] = result["projected_study_minutes_breakdown"]["total"]
    result["projection_note"] = (
        "configs/study.yaml's settings at the rates its stages logged in `python -m posttrain e2e WORKDIR "
        "--measure` on this card (SFT rows/s at the preset's batch; evaluation generation, preference "
        "sampling and teacher-forced scoring tokens/s, all on the nf4 base with the adapter as the preset "
        "holds it; the model stages' start-up), DPO at this bench's bf16 LoRA pairs/s and LLaVA-Critic at "
        "its items/s through the evaluation's judge"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="default: bench/results/<card>.json, e.g. h200.json")
    ap.add_argument(
        "--stage-rates", help="WORKDIR/summary.json of `python -m posttrain e2e WORKDIR --measure`"
    )
    ap.add_argument("--critic-tokens", type=int, default=256, help="new tokens a critic reply (the preset's)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--skip-nf4", action="store_true")
    ap.add_argument("--liger", action="store_true", help="Liger kernels for Llama (RMSNorm, RoPE, SwiGLU)")
    ap.add_argument(
        "--sft-batches", default="8", help="comma-separated bf16 LoRA batch sizes, no checkpointing"
    )
    ap.add_argument(
        "--gen-variants",
        default="64:1:static,64:1:dynamic,64:2:static",
        help="comma-separated batch:samples:cache generation runs through "
        "posttrain.evaluate.generation.generate",
    )
    ap.add_argument("--skip-upcast", action="store_true", help="skip the nf4 run with PEFT's fp32 upcast")
    ap.add_argument(
        "--full-loss-batches", default="", help="nf4 batches also run with the loss at every position"
    )
    ap.add_argument("--nf4-batches", default="8", help="comma-separated QLoRA nf4 batch sizes")
    ap.add_argument("--ckpt-batch", type=int, default=16, help="bf16 batch with checkpointing; 0 skips")
    ap.add_argument("--critic", action="store_true", help="also measure LLaVA-Critic scoring (writes 16 GB)")
    ap.add_argument("--critic-batches", default="16", help="comma-separated critic scoring batch sizes")
    ap.add_argument("--judge", help="bench/judge.py's results: the self-judge's rate for the projection")
    ap.add_argument(
        "--reproject",
        help="a results file of this bench: recompute its projection from --stage-rates, no GPU",
    )
    args = ap.parse_args()
    if args.reproject:
        result = json.loads(Path(args.reproject).read_text())
        judge = json.loads(Path(args.judge).read_text()) if args.judge else None
        add_projection(result, json.loads(Path(args.stage_rates).read_text()), judge)
        Path(args.reproject).write_text(json.dumps(result, indent=2) + "\n")
        print(
            json.dumps({k: result[k] for k in ("stage_rates", "projected_study_minutes_breakdown")}, indent=2)
        )
        return

    def liger(m):
        """Liger's kernels in `m`'s language model as `sft.common.liger` applies them (training only)."""
        if args.liger:
            from posttrain.train.liger import apply_liger

            apply_liger(m, LLAVA_15)
        return m

    torch.backends.cuda.matmul.allow_tf32 = True
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "host": platform.node(),
        "liger": args.liger,
    }
    result.update(card_peaks())
    print(json.dumps(result), flush=True)
    config = load_config("llava-1.5-7b")
    n_params = param_count(config)
    result["params"] = n_params

    model = build_random(config, dtype=torch.bfloat16, device="cuda", seed=0)
    from posttrain.realscale.standin import LLAVA_SPECIALS, standin_tokenizer

    tokenizer = standin_tokenizer(
        ["a chart"], LLAVA_SPECIALS, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>"
    )
    for variant in filter(None, args.gen_variants.split(",")):
        gen_batch, samples, cache = variant.split(":")
        gen_batch, samples = int(gen_batch), int(samples)
        key = f"stage_generate_{cache}_b{gen_batch}" + ("_2samples" if samples == 2 else "")
        try:
            result[key] = stage_generation(
                model,
                config,
                tokenizer,
                2 * gen_batch,
                gen_batch,
                samples,
                cache,
                result["copy_bandwidth_gb_s"],
            )
        except torch.OutOfMemoryError as e:
            result[key] = {"batch": gen_batch, "samples": samples, "cache": cache, "error": repr(e)[:300]}
        print(key, json.dumps(result[key]), flush=True)
        torch.cuda.empty_cache()
    model = liger(model)
    variants = [(int(b), False) for b in args.sft_batches.split(",")]
    variants += [(args.ckpt_batch, True)] if args.ckpt_batch else []
    for bs, ckpt in variants:
        key = f"sft_lora_bf16_b{bs}" + ("_ckpt" if ckpt and bs == 8 else "")
        try:
            result[key], model = sft_throughput(
                model, config, bs, args.steps, n_params, result["bf16_matmul_tflops"], ckpt
            )
        except torch.OutOfMemoryError as e:  # too large a batch is a result too
            result[key] = {"batch": bs, "gradient_checkpointing": ckpt, "error": repr(e)[:200]}
            model = model.unload() if hasattr(model, "peft_config") else model
        print(json.dumps(result[key]), flush=True)
        gc.collect()
        torch.cuda.empty_cache()

    try:
        result["dpo_lora_bf16"], model = dpo_throughput(model, config, 4, args.steps)
    except torch.OutOfMemoryError as e:
        result["dpo_lora_bf16"] = {"error": repr(e)[:200]}
    print(json.dumps(result["dpo_lora_bf16"]), flush=True)
    gc.collect()
    torch.cuda.empty_cache()

    if not args.skip_nf4:
        from peft import prepare_model_for_kbit_training

        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP", "/tmp")) as tmp:
            model.save_pretrained(tmp)
            del model
            gc.collect()
            torch.cuda.empty_cache()
            q = load_llava(tmp, nf4=True)
        # as posttrain.train.sft loads it: unquantized weights stay bf16 (no
        # prepare_model_for_kbit_training)
        q = liger(q)
        intact = True  # an OOM inside sft_throughput leaves LoRA layers injected: stop measuring then
        for bs in sorted(int(b) for b in args.nf4_batches.split(",")):
            key = f"sft_qlora_nf4_b{bs}"
            try:
                result[key], q = sft_throughput(
                    q, config, bs, args.steps, n_params, result["bf16_matmul_tflops"], False
                )
            except torch.OutOfMemoryError as e:
                result[key] = {"batch": bs, "error": repr(e)[:200]}
                intact = False
            print(json.dumps(result[key]), flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            if not intact:
                break
        # before: the loss's logits at every position
        for bs in (int(b) for b in args.full_loss_batches.split(",") if b) if intact else ():
            key = f"sft_qlora_nf4_b{bs}_full_loss"
            result[key], q = sft_throughput(
                q, config, bs, args.steps, n_params, result["bf16_matmul_tflops"], False, full_loss=True
            )
            print(key, json.dumps(result[key]), flush=True)
            gc.collect()
            torch.cuda.empty_cache()
        # before: PEFT's prepare_model_for_kbit_training upcasts the unquantized weights to fp32
        if intact and not args.skip_upcast:
            q = prepare_model_for_kbit_training(q, use_gradient_checkpointing=False)
            result["sft_qlora_nf4_b8_fp32_upcast"], q = sft_throughput(
                q, config, 8, args.steps, n_params, result["bf16_matmul_tflops"], False
            )
            print(json.dumps(result["sft_qlora_nf4_b8_fp32_upcast"]), flush=True)
        del q
        gc.collect()
        torch.cuda.empty_cache()

    if args.critic:
        from posttrain.evaluate.critic import pairwise_prompt, pointwise_prompt
        from posttrain.models.architectures import load_config as critic_config
        from posttrain.realscale.standin import write_critic

        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP", "/tmp")) as tmp:
            write_critic(
                tmp,
                critic_config("llava-critic-7b"),
                [pointwise_prompt("Q", "R"), pairwise_prompt("Q", "A", "B")] * 20,
                device="cuda",
            )
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            for cb in (int(b) for b in args.critic_batches.split(",")):
                result[f"critic_scoring_b{cb}"] = critic_scoring(tmp, 4 * cb, cb, args.critic_tokens)
                print(json.dumps(result[f"critic_scoring_b{cb}"]), flush=True)

    bf16_runs = [v for k, v in result.items() if k.startswith("sft_lora_bf16_b") and "mfu" in v]
    result["sft_lora_bf16_mfu"] = max(
        (v["mfu"] for v in bf16_runs if not v["gradient_checkpointing"]), default=None
    )
    nf4_runs = [
        v
        for k, v in result.items()
        if k.startswith("sft_qlora_nf4_b") and "upcast" not in k and "full_loss" not in k and "mfu" in v
    ]
    result["sft_qlora_nf4_mfu"] = max((v["mfu"] for v in nf4_runs), default=None)
    gens = [g for k, g in result.items() if k.startswith("stage_generate_") and "tokens_per_s" in g]
    best = max(gens, key=lambda g: g["bandwidth_fraction_end_to_end"], default=None)
    result["generate_bandwidth_fraction_end_to_end"] = best and best["bandwidth_fraction_end_to_end"]
    result["generate_best"] = best and {k: best[k] for k in ("batch", "samples", "cache", "tokens_per_s")}
    result["dpo_pairs_per_s"] = result["dpo_lora_bf16"].get("pairs_per_s")
    critic_runs = [v for k, v in result.items() if k.startswith("critic_scoring_b")]
    result["critic_items_per_s"] = max((v["items_per_s"] for v in critic_runs), default=None)

    if args.stage_rates:
        judge = json.loads(Path(args.judge).read_text()) if args.judge else None
        add_projection(result, json.loads(Path(args.stage_rates).read_text()), judge)
    print(json.dumps(result, indent=2))
    card = torch.cuda.get_device_name().split()[1].lower()  # "NVIDIA H200" -> h200
    out = Path(args.out or f"bench/results/{card}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
