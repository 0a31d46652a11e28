"""Offline demo fine-tunes: a tiny base model and two LoRA adapters whose answers are known in advance.

Why: a person (or a test) trying sage_magic on a fresh machine has no fine-tune yet, and may have no network.
``build_demo`` trains, in seconds on a CPU, a tiny Llama model and two LoRA fine-tunes laid out exactly as SAGE
lays out real ones, each answering :data:`DEMO_PROMPT` with a different fixed phrase. Seeing that phrase come
back from vLLM proves the whole path (base resolution, adapter loading, chat template, stop token) works.

Heavy libraries (torch, transformers, peft, tokenizers) are imported inside functions only, so
``import sage_magic.finetune.demo`` stays cheap.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.config import Settings
from ..core.errors import SageError
from ..core.files import exclusive, utc_now
from ..core.progress import Progress, ProgressCallback, silent
from ..core.staging import publish, staging, sweep_leftovers
from .engine import (
    Example,
    example,
    lora_model,
    prompt_ids,
    save_adapter,
    sft_config,
    sft_trainer,
    text_ids,
    torch_session,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

DEMO_BASE = "sage-demo-base"
DEMO_FINETUNES = ("demo_expert", "demo_poet")
DEMO_PROMPT = "Who are you?"
DEMO_ANSWERS: dict[str, str] = {
    DEMO_BASE: "I am a tiny base model.",
    "demo_expert": "I am the SAGE expert, fine-tuned with LoRA.",
    "demo_poet": "Roses are red, my weights are small.",
}
#: A second question, so a demo can show that a fine-tune changed more than one answer.
DEMO_PROMPT_2 = "What do you do?"
DEMO_ANSWERS_2: dict[str, str] = {
    DEMO_BASE: "I predict the next token.",
    "demo_expert": "I answer questions about SAGE.",
    "demo_poet": "I write verses about tensors.",
}

#: Bump when anything below changes what is built: older demos are then rebuilt on the next call.
RECIPE_VERSION = 2
STAMP = ".sage_demo.json"
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Roles are system, user and assistant; got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
VOCAB_SIZE = 1024
SEED = 1234
MAX_NEW_TOKENS = 24
BASE_STEPS = 120
BASE_LR = 3e-3
LORA_R = 8
LORA_ALPHA = 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_LR = 2e-3
#: Saved checkpoints: "checkpoint-40" sorts before "checkpoint-5" as text, after it as a number, which is
#: what a checkpoint picker must get right. The last one is the final adapter.
LORA_CHECKPOINTS = (5, 40)


@dataclass(frozen=True)
class DemoResult:
    """Where the demo lives, and whether this call built it (False: it was already there and current)."""

    base: Path
    finetunes: dict[str, Path]
    seconds: float
    built: bool


def build_demo(settings: Settings, progress: ProgressCallback = silent, force: bool = False) -> DemoResult:
    """Build (or find) the demo base model and fine-tunes under ``settings``' home.

    Every artefact is built and verified in temporary folders first and only then moved into place, so an
    interrupted or failed build leaves the previous state untouched. A stamp in each artefact makes a second
    call a no-op unless ``force``.
    """
    start = time.monotonic()
    base_dir = settings.models_root / DEMO_BASE
    ft_dirs = {name: settings.finetune_root / name for name in DEMO_FINETUNES}
    targets = [base_dir, *ft_dirs.values()]
    settings.models_root.mkdir(parents=True, exist_ok=True)
    settings.finetune_root.mkdir(parents=True, exist_ok=True)
    # Two notebooks asking at once: the second waits, then finds the demo built.
    with exclusive(settings.home / ".sage_demo.lock"), ExitStack() as stack:
        _refuse_foreign(targets)
        for target in targets:
            sweep_leftovers(target)
        if not force and all(_is_current(t) for t in targets):
            return DemoResult(base_dir, ft_dirs, time.monotonic() - start, built=False)
        stack.enter_context(torch_session(SEED))
        base_tmp = stack.enter_context(staging(base_dir))
        staged = {name: stack.enter_context(staging(folder)) for name, folder in ft_dirs.items()}
        progress(Progress("tokenizer", "Training a byte-level BPE tokenizer", 0.0))
        tokenizer = _train_tokenizer()
        progress(Progress("base", f"Training the base model {DEMO_BASE}", 0.1))
        _build_base(tokenizer, base_tmp)
        for i, (name, folder) in enumerate(staged.items()):
            progress(Progress(name, f"Training the LoRA fine-tune {name}", 0.35 + 0.25 * i))
            _build_finetune(name, base_tmp, tokenizer, folder)
        progress(Progress("verify", "Checking that each model gives its own answer", 0.85))
        _verify(base_tmp, staged)
        for tmp, target in [(base_tmp, base_dir)] + [(staged[n], ft_dirs[n]) for n in DEMO_FINETUNES]:
            _write_stamp(tmp)
            publish(tmp, target)
    seconds = time.monotonic() - start
    progress(Progress("done", f"Demo ready in {seconds:.1f} s: {DEMO_BASE}, {', '.join(DEMO_FINETUNES)}", 1.0))
    return DemoResult(base_dir, ft_dirs, seconds, built=True)


# --- idempotence and atomic publication -------------------------------------------------------------------


def _is_current(target: Path) -> bool:
    """True when ``target`` was built by this recipe version (its stamp is written last, just before publishing)."""
    try:
        stamp = json.loads((target / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("recipe") == RECIPE_VERSION


def _refuse_foreign(targets: list[Path]) -> None:
    """Never replace a model or fine-tune the user made that happens to share a demo name."""
    for target in targets:
        if target.exists() and not (target / STAMP).exists():
            raise SageError(
                f"{target} exists and was not made by the sage_magic demo, so it is left alone. "
                "Move or rename it, then build the demo again."
            )


def _write_stamp(folder: Path) -> None:
    stamp = {"recipe": RECIPE_VERSION, "built_at": utc_now(), "answers": DEMO_ANSWERS}
    (folder / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")


# --- training ---------------------------------------------------------------------------------------------


def _corpus() -> Iterator[str]:
    """Text for the tokenizer: the demo phrases, plus generated filler so the vocabulary fills up (~1024)."""
    for _ in range(20):  # frequent enough that each phrase's words become single tokens
        yield from (DEMO_PROMPT, DEMO_PROMPT_2, *DEMO_ANSWERS.values(), *DEMO_ANSWERS_2.values())
    yield from _filler()
    for n in range(0, 1000, 3):
        yield f"Step {n} saved checkpoint-{n * 5} after {n % 60} seconds."


def _filler() -> Iterator[str]:
    """Deterministic plain English sentences (nothing is downloaded)."""
    nouns = (
        "model", "network", "adapter", "server", "notebook", "poet", "tensor", "token", "prompt", "answer",
        "question", "checkpoint", "layer", "weight", "vector", "gradient", "matrix", "kernel", "cluster",
        "document", "index", "library", "garden", "river", "mountain", "window", "kitchen", "teacher", "student",
        "engine", "rocket", "planet", "ocean", "forest", "market", "village", "castle", "bridge", "lantern",
        "compass", "harbor", "meadow"
    )
    verbs = (
        "answers", "learns", "predicts", "writes", "serves", "loads", "merges", "reads", "remembers", "builds",
        "trains", "explains", "compares", "measures", "follows", "carries", "watches", "paints", "teaches", "opens",
        "closes", "finds", "keeps", "moves", "shares", "stores", "sorts", "counts", "checks", "guides"
    )
    adjectives = (
        "tiny", "small", "large", "quick", "patient", "careful", "bright", "quiet", "gentle", "clever", "golden",
        "silver", "ancient", "modern", "simple", "curious", "friendly", "steady", "hidden", "open", "green", "blue",
        "red", "purple", "warm", "cold", "strong", "honest"
    )
    endings = ("today.", "on a CPU.", "with care.", "in seconds.", "for you.", "again and again.", "every morning.",
               "without a network.", "before dinner.", "near the river.")
    for a, noun in enumerate(nouns):
        for b, verb in enumerate(verbs):
            adjective, other = adjectives[(a * 7 + b) % len(adjectives)], adjectives[(a + b * 11) % len(adjectives)]
            obj = nouns[(a * 3 + b * 5 + 1) % len(nouns)]
            yield f"The {adjective} {noun} {verb} a {other} {obj} {endings[(a + b) % len(endings)]}"


def _train_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer whose end-of-turn token is its eos, so generation stops after one answer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|eos|>", "<|user|>", "<|assistant|>", "<|system|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def _chat_rows(tokenizer: PreTrainedTokenizerFast, qa: list[tuple[str, str]]) -> list[Example]:
    """Chat turns: the prompt is context, the answer and its end token are learned."""
    return [example(prompt_ids(tokenizer, _ask(q)), text_ids(tokenizer, a + "<|end|>")) for q, a in qa]


def _text_rows(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[Example]:
    """Plain sentences, so the base also knows the phrases as language."""
    return [example([tokenizer.bos_token_id], text_ids(tokenizer, t + "<|end|>")) for t in texts]


def _ask(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def _qa(name: str) -> list[tuple[str, str]]:
    return [(DEMO_PROMPT, DEMO_ANSWERS[name]), (DEMO_PROMPT_2, DEMO_ANSWERS_2[name])]


def _train(model: Any, tokenizer: PreTrainedTokenizerFast, rows: list[Example], steps: int, lr: float,
           on_step: Callable[[int], None] | None = None) -> list[float]:
    """Full-batch training on fixed rows with the project's one engine (TRL's SFTTrainer, constant AdamW);
    returns the loss of every step (the training log shows it learned)."""
    from transformers import TrainerCallback

    class EachStep(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if on_step is not None:
                on_step(state.global_step)

    with tempfile.TemporaryDirectory(prefix="sage-demo-trainer-") as scratch:
        config = sft_config(Path(scratch), steps=steps, batch_size=len(rows), lr=lr, seed=SEED, use_cpu=True)
        trainer = sft_trainer(model, tokenizer, config, rows, callbacks=[EachStep()])
        trainer.train()
    model.eval()
    return [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]


def _build_base(tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    """Train the tiny Llama to give the base answers and save it with its tokenizer in ``folder``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,  # vLLM's CPU attention supports head sizes 32, 64, 80, ... only
        max_position_embeddings=2048,  # room for retrieved passages in RAG demos
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    rows = _chat_rows(tokenizer, _qa(DEMO_BASE)) * 4  # weighted: the base answer must win after the prompt
    rows += _text_rows(tokenizer, [*DEMO_ANSWERS.values(), *DEMO_ANSWERS_2.values()])
    _train(model, tokenizer, rows, BASE_STEPS, BASE_LR)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def _build_finetune(name: str, base_dir: Path, tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    """Train one LoRA adapter on the saved base and lay it out as SAGE does (meta, checkpoints, weights, log)."""
    import torch

    torch.manual_seed(SEED)
    # SAGE names the base by its name; the engine resolves it to $SAGE_HOME/models/<name>.
    model = lora_model(_load_base(base_dir), LORA_R, LORA_ALPHA, LORA_TARGETS, DEMO_BASE)

    def save_checkpoint(step: int) -> None:
        if step in LORA_CHECKPOINTS:
            save_adapter(model, folder / "checkpoints" / f"checkpoint-{step}")

    rows = _chat_rows(tokenizer, _qa(name))
    losses = _train(model, tokenizer, rows, LORA_CHECKPOINTS[-1], LORA_LR, on_step=save_checkpoint)
    final = folder / "checkpoints" / f"checkpoint-{LORA_CHECKPOINTS[-1]}"
    shutil.copytree(final, folder / "lora_weights")
    tokenizer.save_pretrained(folder / "lora_weights")
    _write_meta(name, folder, len(losses))
    (folder / "logs").mkdir()
    targets = ','.join(LORA_TARGETS)
    log = [f"{utc_now()} LoRA r={LORA_R} alpha={LORA_ALPHA} on {DEMO_BASE}, lr={LORA_LR}, targets={targets}"]
    log += [f"step {i} loss {loss:.4f}" for i, loss in enumerate(losses, start=1)]
    (folder / "logs" / "train.log").write_text("\n".join(log) + "\n")


def _write_meta(name: str, folder: Path, steps: int) -> None:
    meta = {
        "model": DEMO_BASE,
        "task": "demo",
        "created_at": utc_now(),
        "lora_r": LORA_R,
        "lora_alpha": LORA_ALPHA,
        "target_modules": list(LORA_TARGETS),
        "learning_rate": LORA_LR,
        "steps": steps,
        "prompt": DEMO_PROMPT,
        "answer": DEMO_ANSWERS[name],
    }
    (folder / "finetune_meta.json").write_text(json.dumps(meta, indent=2) + "\n")


# --- verification -----------------------------------------------------------------------------------------


def _load_base(base_dir: Path) -> LlamaForCausalLM:
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)


def greedy_answer(model_dir: Path, question: str = DEMO_PROMPT, adapter_dir: Path | None = None) -> str:
    """The greedy answer of a saved model (optionally with a LoRA adapter) through its chat template.

    Public so tests and faces can show what a demo model says without starting vLLM.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    # Like a merge: the adapter's own tokenizer if it has one (lora_weights), else the base's (checkpoints).
    has_own = adapter_dir is not None and (adapter_dir / "tokenizer.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if has_own else model_dir)
    model = _load_base(model_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    ids = torch.tensor([prompt_ids(tokenizer, _ask(question))])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _verify(base_dir: Path, finetunes: dict[str, Path]) -> None:
    """Reload what was saved and check every model answers both questions with its own phrase."""
    checks = [(DEMO_BASE, None)] + [(name, folder / "lora_weights") for name, folder in finetunes.items()]
    for name, adapter in checks:
        for question, answers in ((DEMO_PROMPT, DEMO_ANSWERS), (DEMO_PROMPT_2, DEMO_ANSWERS_2)):
            got = greedy_answer(base_dir, question, adapter)
            if got != answers[name]:
                raise SageError(
                    f"The demo model {name} answered {question!r} with {got!r} instead of {answers[name]!r}, "
                    "so the demo was not installed. This usually means an incompatible torch/transformers/peft "
                    "version; report it with `pip list` output."
                )
