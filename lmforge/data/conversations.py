"""`builtin:conversations`: greetings, a self-introduction, small talk and short sums, from templates.

A chat model fine-tuned only on `builtin:instructions` knows five kinds of
instruction and answers everything else with one of them ("你好" → "正面").
This set, mixed into chat fine-tuning (`mix.sources`), shows it what to say
to a greeting, to "请介绍一下你自己。", to thanks and goodbyes, to questions it
cannot know the answer to, and to short sums; some conversations run several
turns. It is built from the templates below alone (no corpus text, so no
held-out instruction can leak into it), every record is a pure function of
its prompt, and the records carry `{prompt, kind, messages, answer}` like
`builtin:instructions`, split by a hash of `prompt`.

The self-introduction says what the demo's chat model really is and can do;
a model fine-tuned on other data should be given its own.
This module knows records, not tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from lmforge.data.instructions import SYSTEM_PROMPT, rng_of

# A user's greeting -> the greeting that opens the reply.
GREETINGS = {
    "你好": "你好",
    "您好": "您好",
    "你好呀": "你好",
    "嗨": "嗨",
    "哈喽": "哈喽",
    "早上好": "早上好",
    "早": "早上好",
    "中午好": "中午好",
    "下午好": "下午好",
    "晚上好": "晚上好",
    "hi": "你好",
    "Hello": "你好",
    "在吗": "在的",
}
GREETING_ENDS = ("", "！", "。", "～")
OFFERS = ("有什么可以帮你的吗？", "有什么我可以帮忙的吗？", "请问需要什么帮助？", "很高兴见到你，有什么可以帮你的吗？")

INTRODUCTION = "我是一个用 lmforge 训练的小型中文语言模型助手，在1998年1月的《人民日报》上学过中文。"
ABILITIES = (
    "我会判断商品评论是正面还是负面，原样重复一句话，说出一句话的第一个字，数一个短语有几个字，也能续写新闻。"
    "我很小，知道的不多，回答常常会出错。"
)
# (questions, the reply): who it is, what it can do.
ABOUT = (
    (("请介绍一下你自己。", "介绍一下你自己吧。", "你是谁？", "你是什么？", "说说你自己。", "能介绍一下你自己吗？",
      "你是机器人吗？", "你叫什么名字？"), f"{INTRODUCTION}{ABILITIES}"),
    (("你能做什么？", "你会做什么？", "你有什么功能？", "你能帮我做什么？", "你擅长什么？"), ABILITIES),
)  # fmt: skip
SMALL_TALK = (
    (("你好吗？", "最近怎么样？", "你今天好吗？"), ("我很好，谢谢！你呢？", "挺好的，谢谢关心！有什么可以帮你的吗？")),
    (("谢谢。", "谢谢你！", "多谢！", "太感谢了！", "谢谢你的帮助。"), ("不客气！", "不用谢，很高兴能帮到你。")),
    (("再见。", "拜拜！", "下次见！", "我走了。"), ("再见！", "再见，祝你愉快！")),
    (("今天天气怎么样？", "外面下雨了吗？", "明天会下雪吗？"), ("我看不到外面的天气，请看看天气预报。",)),
    (("现在几点了？", "今天几号？", "今天星期几？"), ("我没有时钟和日历，不知道现在的时间。",)),
    (("你会说英语吗？", "Do you speak English?"), ("我主要学的是中文，英语只会一点点。",)),
    (("你几岁了？", "你是男的还是女的？"), ("我是一个语言模型，没有年龄，也没有性别。",)),
    (("讲个笑话吧。", "给我讲个故事。"), ("我学的主要是新闻，不太会讲笑话和故事。你可以让我续写一段新闻。",)),
)  # fmt: skip
SUMS = ("{a}加{b}等于几？", "{a}加{b}等于多少？", "{a}+{b}=?")
DIFFERENCES = ("{a}减{b}等于几？", "{a}减{b}等于多少？", "{a}-{b}=?")
FOLLOW_UPS = ("谢谢。", "谢谢你！", "再见。", "你能做什么？", "你好吗？")
MAX_SUMMAND = 9


def _greeting_reply(greeting: str, rng) -> str:
    return f"{GREETINGS[greeting]}！{rng.choice(OFFERS)}"


def _single_turns() -> Iterator[tuple[str, str, str]]:
    """(kind, user message, reply) of every one-turn conversation."""
    for greeting, end in itertools.product(GREETINGS, GREETING_ENDS):
        prompt = f"{greeting}{end}"
        yield "greeting", prompt, _greeting_reply(greeting, rng_of(prompt))
    for questions, reply in ABOUT:
        for question in questions:
            yield "introduction", question, reply
            for greeting in GREETINGS:  # "你好，请介绍一下你自己。" gets a greeting back first
                yield "introduction", f"{greeting}，{question}", f"{GREETINGS[greeting]}！{reply}"
    for questions, replies in SMALL_TALK:
        for question in questions:
            yield "small_talk", question, rng_of(question).choice(replies)
    for a, b in itertools.product(range(MAX_SUMMAND + 1), repeat=2):
        question = rng_of(f"{a}+{b}").choice(SUMS).format(a=a, b=b)
        yield "arithmetic", question, f"{a}加{b}等于{a + b}。"
        if a >= b:
            question = rng_of(f"{a}-{b}").choice(DIFFERENCES).format(a=a, b=b)
            yield "arithmetic", question, f"{a}减{b}等于{a - b}。"


def conversation_records() -> Iterator[dict]:
    """{prompt, kind, messages, answer}: every one-turn conversation, and a two-turn one after each greeting."""
    turns = list(_single_turns())
    replies = {prompt: reply for _, prompt, reply in turns}
    for kind, prompt, reply in turns:
        rng = rng_of(f"conversation:{prompt}")  # not the reply's draw: system prompts fall on every kind of reply
        system = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.3 else []
        messages = [*system, {"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
        yield {"prompt": prompt, "kind": kind, "messages": messages, "answer": reply}
        if kind == "greeting":
            # A second turn after the greeting, answered on its own: the history is context, not the question.
            question = rng.choice(FOLLOW_UPS)
            answer = replies[question]
            messages = [*messages, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            yield {"prompt": f"{prompt}\n{question}", "kind": "multi_turn", "messages": messages, "answer": answer}
