"""Chat: the template matches transformers' apply_chat_template, loss only on the assistant, packing never leaks."""

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import lmforge
from lmforge.config import from_dict
from lmforge.data import chat as chat_data
from lmforge.data.batches import IGNORE_INDEX, pack_documents
from lmforge.data.chat import encode_chat, render_chat, truncate_chat
from lmforge.data.instructions import CHECKABLE_KINDS
from lmforge.data.sources import read_records, split_of
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.lm import load
from lmforge.models import load_model
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.lora import load_adapter
from lmforge.tasks import chat
from lmforge.tasks.base import run_task
from lmforge.tasks.examples import TaskData
from lmforge.train.objectives import chat_sft_loss

CONVERSATION = [
    {"role": "system", "content": "你是一个乐于助人的助手。"},
    {"role": "user", "content": "今天天气怎么样？\n\n请简短回答"},
    {"role": "assistant", "content": "今天天气很好。"},
    {"role": "user", "content": "hello, 明天呢?"},
    {"role": "assistant", "content": "明天下雨 rain"},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    texts = ["今天天气很好，明天下雨。你是一个乐于助人的助手。", "hello rain, what about tomorrow?"] * 20
    folder = tmp_path_factory.mktemp("tokenizer")
    Tokenizer.train(texts, vocab_size=320, show_progress=False).save(folder)
    return Tokenizer.load(folder)  # as a run folder gives it: the template read back from tokenizer_config.json


def test_template_renders_the_same_ids_as_transformers_apply_chat_template(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    reference = AutoTokenizer.from_pretrained(tmp_path)
    for messages, prompt in [(CONVERSATION, False), (CONVERSATION[:4], True), (CONVERSATION[1:2], True)]:
        expected = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt)["input_ids"]
        assert encode_chat(tokenizer, messages, prompt).ids == expected
        assert reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) == render_chat(
            tokenizer, messages, prompt
        )
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == tokenizer.chat_template


def test_markers_are_single_special_tokens(tokenizer):
    ids = encode_chat(tokenizer, CONVERSATION[1:2], add_generation_prompt=True).ids
    assert ids[:2] == [tokenizer.bos_id, tokenizer.im_start_id]
    assert ids.count(tokenizer.im_start_id) == 2 and ids.count(tokenizer.im_end_id) == 1


def test_only_assistant_replies_and_their_end_markers_carry_loss(tokenizer):
    tokens = encode_chat(tokenizer, CONVERSATION)
    learned = [token for token, weight in zip(tokens.ids, tokens.loss_mask) if weight]
    expected = []
    for reply in ("今天天气很好。", "明天下雨 rain"):
        expected += [*tokenizer.encode(reply), tokenizer.im_end_id]
    assert learned == expected
    # Everything the system and the user said has zero weight.
    for message in CONVERSATION:
        if message["role"] != "assistant":
            spoken = tokenizer.encode(message["content"])
            starts = [i for i in range(len(tokens.ids)) if tokens.ids[i : i + len(spoken)] == spoken]
            assert starts and not any(tokens.loss_mask[starts[0] : starts[0] + len(spoken)])


def test_truncation_drops_the_oldest_turns_and_keeps_the_system_prompt(tokenizer):
    full = len(encode_chat(tokenizer, CONVERSATION).ids)
    kept, tokens = truncate_chat(tokenizer, CONVERSATION, full - 1)
    assert kept == [CONVERSATION[0], *CONVERSATION[3:]]
    assert len(tokens.ids) <= full - 1
    assert truncate_chat(tokenizer, CONVERSATION, full)[0] == CONVERSATION
    with pytest.raises(UserError, match="last message needs"):
        truncate_chat(tokenizer, CONVERSATION, 10)


def test_templates_render_in_a_sandbox(tokenizer):
    own = tokenizer.chat_template
    tokenizer.chat_template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    try:
        with pytest.raises(UserError, match="chat template"):
            render_chat(tokenizer, CONVERSATION)
    finally:
        tokenizer.chat_template = own  # the fixture is shared by the module's later tests


# Qwen2.5-Instruct's template (tools left out): it reads messages[0] to decide on a default system prompt.
QWEN_STYLE_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_templates_that_read_the_first_message_work_in_training_and_chat(tokenizer):
    from lmforge.chat_terminal import ChatSession
    from lmforge.lm import LM

    qwen_style = Tokenizer.from_str(tokenizer.to_str(), QWEN_STYLE_TEMPLATE)
    tokens = encode_chat(qwen_style, CONVERSATION[1:3])
    assert qwen_style.decode(tokens.ids, skip_special_tokens=False).startswith("<|im_start|>system\nYou are a helpful")
    learned = [token for token, weight in zip(tokens.ids, tokens.loss_mask) if weight]
    assert learned == [*qwen_style.encode("今天天气很好。"), qwen_style.im_end_id]

    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=qwen_style.vocab_size, hidden_size=16, num_layers=1, num_heads=2,
                           intermediate_size=32, max_position_embeddings=128)  # fmt: skip
    lm = LM(Decoder(config), qwen_style)
    assert isinstance(lm.chat(CONVERSATION[1:2], max_new_tokens=3, temperature=0), str)  # LM.chat
    session = ChatSession(lm, system="你是一个乐于助人的助手。", max_new_tokens=3, temperature=0)  # lmforge chat
    session.reply("明天呢?", lambda piece: None)
    assert [message["role"] for message in session.messages()] == ["system", "user", "assistant"]


def test_bad_messages_are_named():
    with pytest.raises(UserError, match="role 'bot'"):
        chat.check_messages([{"role": "bot", "content": "hi"}])
    with pytest.raises(UserError, match="only the first"):
        chat.check_messages([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])


def tiny_decoder(vocab_size: int, context: int = 64, initializer_range: float = 0.02) -> Decoder:
    torch.manual_seed(0)
    config = DecoderConfig(
        vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
        max_position_embeddings=context, initializer_range=initializer_range,
    )  # fmt: skip
    return Decoder(config).eval()


def test_packed_conversations_compute_exactly_as_if_each_were_alone(tokenizer):
    model = tiny_decoder(tokenizer.vocab_size, context=256)
    documents = [encode_chat(tokenizer, CONVERSATION[i:j]) for i, j in ((1, 3), (3, 5), (0, 3))]
    length = len(documents[0].ids) + len(documents[1].ids) + 3
    rows = pack_documents([(d.ids, d.loss_mask) for d in documents], length, tokenizer.pad_id)
    assert rows["input_ids"].shape[0] == 2  # the first two share a row, the third does not fit beside them
    packed = model(rows["input_ids"][:1], segment_ids=rows["segment_ids"][:1])
    start = 0
    for document in documents[:2]:
        alone = model(torch.tensor([document.ids]))
        end = start + len(document.ids)
        torch.testing.assert_close(packed[0, start:end], alone[0], atol=1e-5, rtol=1e-5)
        start = end
    # Targets: next assistant token within a conversation, never across the boundary or on padding.
    targets, ids = rows["targets"][0], rows["input_ids"][0]
    first = documents[0]
    boundary = len(first.ids) - 1
    assert targets[boundary] == IGNORE_INDEX
    for t in range(boundary):
        expected = first.ids[t + 1] if first.loss_mask[t + 1] else IGNORE_INDEX
        assert targets[t] == expected
    assert (targets[start:] == IGNORE_INDEX).all() and (ids[start:] == tokenizer.pad_id).all()


def test_sft_loss_ignores_user_and_system_tokens(tokenizer):
    model = tiny_decoder(tokenizer.vocab_size, context=256)
    tokens = encode_chat(tokenizer, CONVERSATION)
    rows = pack_documents([(tokens.ids, tokens.loss_mask)], 256, tokenizer.pad_id)
    loss, count = chat_sft_loss(model, rows)
    assert count == len(tokens.ids)
    assert int((rows["targets"] != IGNORE_INDEX).sum()) == sum(tokens.loss_mask[1:])
    # Changing what the user said changes the inputs but not which tokens are scored.
    logits = model(rows["input_ids"], segment_ids=rows["segment_ids"])
    reference = torch.nn.functional.cross_entropy(logits[0], rows["targets"][0], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)


def test_builtin_instructions_are_deterministic_and_their_answers_check_out():
    first = list(itertools.islice(read_records("builtin:instructions"), 0, 30000, 97))
    again = list(itertools.islice(read_records("builtin:instructions"), 0, 30000, 97))
    assert first == again
    records = list(itertools.islice(read_records("builtin:instructions"), 28000, 40000))
    kinds = {r["kind"] for r in records}
    assert {"sentiment", "repeat", "first_char", "count", "follow_up", "continue"} <= kinds
    for record in records:
        chat.check_messages(record["messages"])
        assert record["messages"][-1] == {"role": "assistant", "content": record["answer"]}
        user = record["messages"][-2]["content"] if record["kind"] != "follow_up" else record["messages"][1]["content"]
        if record["kind"] == "repeat":
            assert user.endswith(record["answer"])
        if record["kind"] == "count":
            phrase = user[1 : user.rindex("”有几个字")]
            assert record["answer"] == f"{len(phrase)}个字"
        if record["kind"] == "first_char":
            assert user[1] == record["answer"]
    preferences = list(itertools.islice(read_records("builtin:preferences"), 0, 2000))
    assert all(p["chosen"] != p["rejected"] and p["messages"][-1]["role"] == "user" for p in preferences)
    assert all(p["kind"] in CHECKABLE_KINDS for p in preferences)


def sft_overrides(chat_data, base_run, **extra) -> dict:
    values = {
        "data": {"source": str(chat_data)},
        "base": str(base_run),
        "train": {"max_steps": 120, "batch_size": 8, "lr": 1e-2, "warmup_steps": 10, "eval_every": 120},
        "max_new_tokens": 4,
        "device": "cpu",
    }
    return values | extra


def test_sft_learns_the_task_and_reports_accuracy_beside_the_base(chat_data, base_run, tmp_path):
    recipe = from_dict(chat.Recipe, sft_overrides(chat_data, base_run))
    metrics = run_task(chat.TASK, recipe, tmp_path, progress=False)
    losses = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    valid = [r["valid_loss"] for r in losses if "valid_loss" in r]
    assert valid[-1] < valid[0] * 0.5
    base = metrics["baselines"][f"base model before fine-tuning ({base_run})"]
    assert metrics["accuracy"] >= 0.75 > base["accuracy"]
    assert metrics["accuracy"] > metrics["baselines"][chat.MAJORITY]["accuracy"]  # 4 colours: about a quarter
    assert metrics["assistant_loss"] < base["assistant_loss"] - 1.0
    report = (tmp_path / "report.md").read_text()
    assert "exact match" in report and "before fine-tuning" in report and chat.MAJORITY in report
    shown = [prompt for prompt, _ in metrics["free_form"]]  # those that fit this 64-token model, in order
    assert shown and shown == [prompt for prompt in chat.FREE_FORM_PROMPTS if prompt in shown]
    assert "## Free-form exchanges" in report and "**助手**：" in report
    assert (tmp_path / "tokenizer_config.json").is_file() and (tmp_path / "model.safetensors").is_file()


def test_lora_sft_trains_few_parameters_and_saves_the_adapter_beside_the_merged_model(chat_data, base_run, tmp_path):
    values = sft_overrides(chat_data, base_run, lora={"rank": 2, "alpha": 8.0, "targets": "q,v"})
    values["train"]["weight_decay"] = 0.0
    run_task(chat.TASK, from_dict(chat.Recipe, values), tmp_path, progress=False)
    task = json.loads((tmp_path / "task.json").read_text())
    assert task["trainable_parameters"] == 2 * 2 * (2 * 32 + 32 * 2) < 0.05 * task["parameters"]
    losses = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    valid = [r["valid_loss"] for r in losses if "valid_loss" in r]
    assert valid[-1] < valid[0] - 0.5
    # The adapter, loaded onto the base on its own, gives what the saved merged model gives.
    base = load_model(base_run)
    load_adapter(tmp_path, base)
    merged = load_model(tmp_path)
    question = [{"role": "user", "content": "第1句的颜色是红"}]
    ids = torch.tensor([encode_chat(Tokenizer.load(tmp_path), question, add_generation_prompt=True).ids])
    torch.testing.assert_close(base(ids), merged(ids), atol=1e-5, rtol=1e-5)
    # A folder with only the adapters loads as base + adapters.
    (tmp_path / "model.safetensors").unlink()
    adapter_only = lmforge.load(tmp_path)
    torch.testing.assert_close(adapter_only.model(ids), merged(ids), atol=1e-5, rtol=1e-5)


def test_sft_needs_a_decoder_base(chat_data, tmp_path):
    recipe = from_dict(chat.Recipe, {"data": {"source": str(chat_data)}})
    with pytest.raises(UserError, match="--base"):
        run_task(chat.TASK, recipe, tmp_path, progress=False)


def test_conversations_must_end_with_the_assistant(tmp_path, write_jsonl):
    for split in ("train", "valid", "test"):
        write_jsonl(tmp_path / f"{split}.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(UserError, match="record 1 .* does not end with an assistant"):
        chat.conversations(TaskData(source=str(tmp_path)), "train")


def test_lora_flags_and_chat_eval_through_the_cli(chat_data, base_run, tmp_path):
    def cli(*arguments):
        return subprocess.run(
            [sys.executable, "-m", "lmforge", *arguments], capture_output=True, text=True, timeout=600
        )

    run = tmp_path / "run"
    trained = cli(
        "finetune", "--task", "chat", "--base", str(base_run), "--data", str(chat_data), "--out", str(run),
        "--max-steps", "20", "--lora-rank", "2", "--lora-alpha", "4", "--lora-targets", "q,v", "--device", "cpu",
        "--max_new_tokens", "4",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert json.loads((run / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    scored = cli("eval", "--task", "chat", "--model", str(run), "--data", str(chat_data), "--split", "test",
                 "--max-examples", "8", "--json")  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-2000:]
    metrics = json.loads(scored.stdout)
    assert metrics["examples_scored"] == 8 and 0 <= metrics["accuracy"] <= 1
    refused = cli("finetune", "--task", "sentiment", "--out", str(tmp_path / "s"), "--lora-rank", "2")
    assert refused.returncode == 2 and "lora" in refused.stderr


TOOLS = [
    {"type": "function", "function": {"name": "calculator", "description": "计算算式",
     "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}},
    {"type": "function", "function": {"name": "date", "parameters": {"type": "object", "properties": {
        "start": {"type": "string"}, "end": {"type": "string"}}}}},
]  # fmt: skip
CALL = {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": {"expression": "3*(4+5)"}}}
TOOL_CONVERSATION = [
    {"role": "system", "content": "你是一个乐于助人的助手。"},
    {"role": "user", "content": "3乘以4加5的和是多少？"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "27"},
    {"role": "assistant", "content": "是27。", "reasoning_content": "工具算出27"},
]


def test_tools_calls_and_traces_render_the_same_ids_as_transformers(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    reference = AutoTokenizer.from_pretrained(tmp_path)
    for messages, prompt in [(TOOL_CONVERSATION, False), (TOOL_CONVERSATION[:4], True), (TOOL_CONVERSATION[1:2], True)]:
        text = reference.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=prompt)
        assert text == render_chat(tokenizer, messages, prompt, tools=TOOLS)
        expected = reference.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=prompt)["input_ids"]
        assert encode_chat(tokenizer, messages, prompt, tools=TOOLS).ids == expected
    text = render_chat(tokenizer, TOOL_CONVERSATION, tools=TOOLS)
    assert "calculator(expression)：计算算式\ndate(start, end)\n</tools>" in text
    assert '<tool_call>\n{"name": "calculator", "arguments": {"expression": "3*(4+5)"}}\n</tool_call>' in text
    assert "<|im_start|>tool\n27<|im_end|>" in text and "<think>\n工具算出27\n</think>\n是27。" in text


def test_without_tools_the_template_renders_as_plain_chatml(tokenizer):
    from lmforge.data.tokenizer import PLAIN_CHATML_TEMPLATE

    old = Tokenizer.from_str(tokenizer.to_str(), chat_template=PLAIN_CHATML_TEMPLATE)
    assert chat_data.chat_template(old) == tokenizer.chat_template  # older run folders read as today's template
    plain = Tokenizer.from_str(tokenizer.to_str(), chat_template="{{ bos_token }}" + PLAIN_CHATML_TEMPLATE[15:])
    for prompt in (False, True):
        assert render_chat(tokenizer, CONVERSATION, prompt) == render_chat(plain, CONVERSATION, prompt)


def _masked_text(tokenizer, tokens) -> str:
    return tokenizer.decode([i for i, m in zip(tokens.ids, tokens.loss_mask) if m], skip_special_tokens=False)


def test_loss_covers_calls_and_replies_never_tool_results_and_the_trace_only_when_asked(tokenizer):
    learnt = _masked_text(tokenizer, encode_chat(tokenizer, TOOL_CONVERSATION, tools=TOOLS))
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "3*(4+5)"}}\n</tool_call><|im_end|>'
    assert learnt == call + "<think>\n工具算出27\n</think>\n是27。<|im_end|>"
    without_trace = encode_chat(tokenizer, TOOL_CONVERSATION, tools=TOOLS, trace_loss=False)
    assert _masked_text(tokenizer, without_trace) == call + "\n是27。<|im_end|>"


def test_replies_are_read_back_into_trace_content_and_calls():
    reply = chat_data.parse_reply('<think>\n先算\n</think>\n<tool_call>\n{"name": "calculator", "arguments": '
                             '{"expression": "1+2"}}\n</tool_call>\n'
                             '<tool_call>{"name": "date", "arguments": {}}</tool_call>')  # fmt: skip
    assert reply.reasoning == "先算" and reply.content == ""
    assert reply.tool_calls == [
        {"name": "calculator", "arguments": {"expression": "1+2"}},
        {"name": "date", "arguments": {}},
    ]
    broken = '好的<tool_call>\n{"name": "calculator", "arguments": {"expression": </tool_call>'
    assert chat_data.parse_reply(broken) == chat_data.ParsedReply(broken)  # malformed JSON: all of it is content
    assert chat_data.parse_reply("是27。") == chat_data.ParsedReply("是27。")


@pytest.mark.parametrize(
    "tools,message",
    [
        ([TOOLS[0], TOOLS[0]], "two tools are named 'calculator'"),
        ([{"type": "function", "function": {"name": "a b"}}], "has name 'a b'"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}], "not a JSON Schema type"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"properties": []}}}], "'properties' must be"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
            "must describe an object",
        ),
        ("calculator", "'tools' must be a list"),
    ],
)
def test_bad_tools_are_one_line_errors(tools, message):
    with pytest.raises(UserError, match=message):
        chat_data.check_tools(tools)


def test_tool_results_must_answer_a_call():
    with pytest.raises(UserError, match="made no tool call"):
        chat_data.check_messages([{"role": "user", "content": "a"}, {"role": "tool", "content": "1"}])
    with pytest.raises(UserError, match="answers tool call 'call_9'"):
        chat_data.check_messages([*TOOL_CONVERSATION[1:3], {"role": "tool", "tool_call_id": "call_9", "content": "1"}])
    text_arguments = {**CALL, "function": {"name": "calculator", "arguments": '{"expression": "1"}'}}
    checked = chat_data.check_messages(
        [TOOL_CONVERSATION[1], {"role": "assistant", "content": "", "tool_calls": [text_arguments]}]
    )
    assert checked[1]["tool_calls"][0]["function"]["arguments"] == {"expression": "1"}
    with pytest.raises(UserError, match="are not JSON"):
        bad = {**CALL, "function": {"name": "calculator", "arguments": "{oops"}}
        chat_data.check_messages([TOOL_CONVERSATION[1], {"role": "assistant", "content": "", "tool_calls": [bad]}])


def _record(kind: str, user: str, answer: str) -> dict:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"prompt": user, "kind": kind, "messages": messages, "answer": answer}


def test_trivial_baselines_answer_each_kinds_majority_or_echo_the_user():
    train = [_record("sentiment", f"评论{i}", label) for i, label in enumerate(["负面", "负面", "正面"])]
    train += [
        _record("repeat", "请重复：好", "好"),
        _record("repeat", "请重复：坏", "坏。"),
        _record("repeat", "?", "坏"),
    ]
    train.append(_record("continue", "续写：今天", "天气很好"))  # a kind absent from the scored records
    scored = [_record("sentiment", f"新评论{i}", label) for i, label in enumerate(["负面", "正面", "负面", "负面"])]
    scored += [_record("repeat", "坏", "坏"), _record("repeat", "请重复：好", "好")]
    baselines = chat.trivial_baselines(train, scored)
    # Majority: "负面" is right for 3 of 4 reviews; "坏" (two of three, the full stop ignored) for 1 of 2 repeats.
    assert baselines[chat.MAJORITY] == {"accuracy": 4 / 6, "accuracy_repeat": 0.5, "accuracy_sentiment": 0.75}
    # Echo: only the record whose user message is its own answer.
    assert baselines[chat.ECHO] == {"accuracy": 1 / 6, "accuracy_repeat": 0.5, "accuracy_sentiment": 0.0}


def test_builtin_conversations_are_deterministic_and_a_greeting_gets_a_greeting():
    records = list(read_records("builtin:conversations"))
    assert records == list(read_records("builtin:conversations"))
    assert len({r["prompt"] for r in records}) == len(records)
    assert {"greeting", "introduction", "small_talk", "arithmetic", "multi_turn"} == {r["kind"] for r in records}
    for record in records:
        chat.check_messages(record["messages"])
        assert record["messages"][-1] == {"role": "assistant", "content": record["answer"]}
    replies = {r["prompt"]: r["answer"] for r in records}
    assert replies["你好，请介绍一下你自己。"].startswith("你好！我是")
    assert replies["晚上好"].startswith("晚上好！") and "7加5等于12。" in replies.values()
    assert not set(replies.values()) & {"正面", "负面"}


def _mix_recipe(chat_data, base_run, sources: str, share: float) -> chat.Recipe:
    return from_dict(chat.Recipe, {"data": {"source": str(chat_data)}, "base": str(base_run),
                                   "mix": {"sources": sources, "share": share}})  # fmt: skip


def test_the_mix_adds_its_share_of_general_conversations_that_fit(chat_data, base_run, tmp_path, write_jsonl):
    tokenizer = Tokenizer.load(base_run)

    def conversation(user: str, reply: str) -> dict:
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}

    for split, count in (("train", 7), ("valid", 2), ("test", 1)):
        fitting = [conversation(f"你好{i}", f"你好！{i}") for i in range(count)]
        write_jsonl(tmp_path / f"{split}.jsonl", [*fitting, conversation("长", "长" * 500)])
    alone = chat.mixed_documents(tokenizer, _mix_recipe(chat_data, base_run, "", 0.2), "train", 64)
    assert len(alone) == 200
    mixed = chat.mixed_documents(tokenizer, _mix_recipe(chat_data, base_run, str(tmp_path), 0.2), "train", 64)
    assert mixed[:200] == alone and len(mixed) == 250  # 50 of 250 = 20%
    general = {tuple(ids) for ids, _ in mixed[200:]}
    assert len(general) == 7  # the 7 that fit 64 tokens, each drawn once per round; the 500-character one left out
    valid = chat.mixed_documents(tokenizer, _mix_recipe(chat_data, base_run, str(tmp_path), 0.5), "valid", 64)
    assert len(valid) == 16 + 2  # validation takes each general conversation at most once
    with pytest.raises(UserError, match="no-such-folder"):
        chat.mixed_documents(tokenizer, _mix_recipe(chat_data, base_run, str(tmp_path / "no-such-folder"), 0.2),
                             "train", 64)  # fmt: skip
    with pytest.raises(UserError, match="mix.share"):
        _mix_recipe(chat_data, base_run, "builtin:conversations", 1.0)


SHARED_CHAT = Path(__file__).resolve().parents[2] / "shared" / "data" / "chat"


@pytest.mark.skipif(not SHARED_CHAT.is_dir(), reason=f"{SHARED_CHAT} (the shared chat data) is not on this machine")
def test_the_mix_reads_builtin_conversations_and_the_shared_chat_data(chat_data, base_run):
    tokenizer = Tokenizer.load(base_run)
    recipe = _mix_recipe(chat_data, base_run, f"builtin:conversations, {SHARED_CHAT}", 0.9)
    mixed = chat.mixed_documents(tokenizer, recipe, "valid", 256)  # the validation split: every one that fits, once
    shared = read_records(str(SHARED_CHAT / "valid.jsonl"))
    fitting = chat.encode_conversations(tokenizer, list(shared), 256)
    builtin = [r for r in read_records("builtin:conversations") if split_of(r["prompt"], 0.05, 0.05) == "valid"]
    fitting += chat.encode_conversations(tokenizer, builtin, 256)
    assert 20 < len(fitting) < 167 + len(builtin)  # the long shared conversations are left out
    assert sorted(mixed[16:]) == sorted(fitting) and all(len(ids) <= 256 for ids, _ in mixed)


def test_replies_shown_for_unscored_data_are_decoded_within_the_evaluation_reply_limit(base_run, write_jsonl, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(base_run, model)
    (model / "generation_config.json").write_text(json.dumps({"max_new_tokens": 32}))  # half of its 64 positions
    lm = load(model)
    text = "第0句的颜色是"
    while len(lm.encode_chat_prompt([{"role": "user", "content": text}], 8)) <= 32:
        text += "红绿蓝"[len(text) % 3]  # a prompt too long for 32 new tokens, short enough for 8
    records = [{"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "红"}]}] * 3
    (tmp_path / "data").mkdir()
    for split in ("train", "valid", "test"):
        write_jsonl(tmp_path / "data" / f"{split}.jsonl", records)
    metrics = chat.evaluate_run(model, TaskData(source=str(tmp_path / "data")), out_dir=tmp_path / "report",
                                max_new_tokens=8, progress=False)  # fmt: skip
    assert metrics["examples_scored"] == 0 and text in (tmp_path / "report" / "report.md").read_text()
