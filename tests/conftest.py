"""Fixtures shared by the chat, preference and distillation tests: a tiny checkable chat task and a base model."""

import json
import time

import pytest
import torch

from lmforge.data.tokenizer import Tokenizer
from lmforge.models import save_model
from lmforge.models.decoder import Decoder, DecoderConfig

COLOURS = ["红", "绿", "蓝", "黄"]


def run_whole_and_in_parts(task, recipe_for_steps, tmp_path, steps=4) -> list[float]:
    """Run `task` for `steps` steps in one go (tmp_path/whole), and for half of them then resumed to all
    (tmp_path/parts); asserts both logged the same losses and returns them."""
    from lmforge.run_folder import RunFolder
    from lmforge.tasks.base import run_task

    run_task(task, recipe_for_steps(steps), tmp_path / "whole", progress=False)
    run_task(task, recipe_for_steps(steps // 2), tmp_path / "parts", progress=False)
    run_task(task, recipe_for_steps(steps), tmp_path / "parts", resume=True, progress=False)
    losses = [[r["loss"] for r in RunFolder(tmp_path / name).read_metrics_log() if "loss" in r]
              for name in ("whole", "parts")]  # fmt: skip
    assert losses[0] == losses[1] and len(losses[0]) == steps
    return losses[0]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


@pytest.fixture(scope="session")
def write_jsonl():
    return _write_jsonl


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and a second thread stalls while another process holds a core.

    Modules of tiny-model tests use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory):
    """A checkable task a tiny model learns in seconds: answer the colour word the user's sentence ends with.

    The folder has ../shared/data/chat's layout: train/valid/test.jsonl conversations, and
    preference_train/preference_test.jsonl pairs (the right colour chosen, another one rejected).
    """
    folder = tmp_path_factory.mktemp("chat-data")
    for split, count in (("train", 200), ("valid", 16), ("test", 16)):
        records, pairs = [], []
        for index in range(count):
            word = COLOURS[(index * 7 + len(split)) % 4]
            prompt = f"第{index}句的颜色是{word}"
            question = [{"role": "user", "content": prompt}]
            records.append(
                {"prompt": prompt, "kind": "first_char", "answer": word,
                 "messages": [*question, {"role": "assistant", "content": word}]}
            )  # fmt: skip
            wrong = COLOURS[(COLOURS.index(word) + 1 + index % 3) % 4]
            pairs.append(
                {"prompt": prompt, "kind": "first_char", "messages": question, "chosen": word, "rejected": wrong}
            )
        _write_jsonl(folder / f"{split}.jsonl", records)
        if split != "valid":
            _write_jsonl(folder / f"preference_{split}.jsonl", pairs)
    return folder


@pytest.fixture(scope="session")
def base_run(tmp_path_factory, chat_data):
    """A tiny decoder with a tokenizer trained on the task's prompts, saved as a run folder."""
    folder = tmp_path_factory.mktemp("base")
    texts = [json.loads(line)["prompt"] for line in (chat_data / "train.jsonl").read_text().splitlines()]
    tokenizer = Tokenizer.train(texts, vocab_size=300, show_progress=False)
    tokenizer.save(folder)
    torch.manual_seed(0)
    # A wide init stands in for pretraining: a frozen output layer near zero would leave LoRA nothing to steer.
    config = DecoderConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
        max_position_embeddings=64, initializer_range=0.2,
    )  # fmt: skip
    save_model(folder, Decoder(config))
    return folder


@pytest.fixture(scope="session")
def served_lm(base_run):
    import lmforge

    return lmforge.load(base_run, device="cpu")


class _EndlessDecoder(Decoder):
    """A decoder that writes about 40 tokens/s and never ends a reply itself: a reply lasts until stopped."""

    end_ids: list[int] = []

    def forward(self, *args, **kwargs):
        time.sleep(0.025)
        logits = super().forward(*args, **kwargs)
        logits[..., self.end_ids] = float("-inf")
        return logits


@pytest.fixture(scope="session")
def web_server(base_run):
    """Base URL of a live server (no API key) whose replies stream slowly and run until max_tokens or Stop."""
    from lmforge.lm import LM
    from lmforge.serve.app import background_server, create_app

    tokenizer = Tokenizer.load(base_run)
    torch.manual_seed(0)
    config = DecoderConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
        max_position_embeddings=2048, initializer_range=0.2,
    )  # fmt: skip
    model = _EndlessDecoder(config)
    model.end_ids = [tokenizer.eos_id, tokenizer.im_end_id]
    with background_server(create_app(LM(model, tokenizer), model_name="endless")) as url:
        yield url
